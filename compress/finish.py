"""What ``lrc compress`` does with the checkpoint once its blocks are written, before the checkpoint is moved into
place: the recipe's recovery fine-tuning (``finetune``: the model trained and written again), its evaluation
(``eval``) and the sample generations (``samples``, dense beside compressed), in that order, each on the checkpoint
as written. Fine-tuning and evaluation hold the model whole in memory. The samples alone (the default) do so only
for models of at most 64 MiB of weights (both together); larger ones generate block by block
(``engine/lazy.py``, ``LazyBlocks.stream``), so with default settings peak memory does not grow with depth
(issue 22)."""
from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path


def _rewrite(model, tokenizer, directory: Path) -> None:
    """Replace the checkpoint's weights in ``directory`` with ``model``'s (one file or shards, as transformers
    writes them)."""
    from .checkpoint.save import save_checkpoint

    for f in [*directory.glob("*.safetensors"), *directory.glob("*.safetensors.index.json")]:
        f.unlink()
    save_checkpoint(model.cpu(), tokenizer, directory)


def finish(tmp: Path, model_spec: str, tokenizer, recipe, report: dict, out: Path, resume: bool,
           progress: bool) -> None:
    """Fine-tune, evaluate and sample the checkpoint in ``tmp`` as ``recipe`` says; records go into ``report``."""
    if recipe.finetune is None and recipe.eval is None and not recipe.samples:
        return
    from .checkpoint import load
    from .engine.device import resolve_device
    from .models import load_model
    from .progress import Progress

    device = resolve_device(recipe.engine.device)  # where it was compressed
    dtype = recipe.model.dtype
    if recipe.finetune is None and recipe.eval is None:  # the default: samples only, streamed where needed
        report["samples"] = streamed_samples(tmp, model_spec, tokenizer, recipe.samples, dtype, device)
        return
    written = load(tmp, dtype=dtype)
    if recipe.finetune is not None:
        from .finetune.run import state_dir, train_model

        state = state_dir(str(out.resolve()), recipe.finetune)
        bar = Progress(enabled=progress)
        try:
            record = train_model(written, tokenizer, recipe.finetune, device, state, model_spec, resume, dtype=dtype)
        except BaseException:
            bar.close()  # after an error, the error is the only line
            raise
        bar.done()
        report["finetune"] = {"from": "the compressed model (recipe section finetune)", **record}
        _rewrite(written, tokenizer, tmp)
        shutil.rmtree(state, ignore_errors=True)
        written = load(tmp, dtype=dtype)  # what follows sees the checkpoint as written
    written.to(device)
    needs_reference = recipe.eval is not None and (recipe.eval.kl or recipe.eval.chat)
    reference = load_model(model_spec, dtype)[0].to(device) if needs_reference else None
    if recipe.eval is not None:
        from .eval.run import evaluate_model

        t1 = time.perf_counter()
        report["eval"] = evaluate_model(written, tokenizer, recipe.eval, reference, progress=progress)
        report["eval_seconds"] = round(time.perf_counter() - t1, 3)
    if recipe.samples:
        from .eval.samples import generate, side_by_side

        mine = generate(written, tokenizer, recipe.samples)
        del written  # the dense model is loaded after the compressed one is gone
        if reference is None:
            reference = load_model(model_spec, dtype)[0].to(device)
        report["samples"] = side_by_side(tokenizer, mine, generate(reference, tokenizer, recipe.samples))


# models whose two weight files together stay under this generate their samples whole (fast, and a constant
# bound on what they add to the peak); larger ones generate block by block, one decoder block in memory at a time
WHOLE_SAMPLES_BYTES = 64 * 2**20


def _weight_bytes(path: str) -> int | None:
    """Bytes of a local model directory's safetensors files (None: not a local safetensors directory)."""
    files = list(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def streamed_samples(tmp: Path, model_spec: str, tokenizer, n: int, dtype: str, device) -> dict:
    """The sample generations (compressed, then dense). The models are loaded whole when both weight files together
    hold at most ``WHOLE_SAMPLES_BYTES``; else (a CPU run) each generates block by block, one decoder block in memory
    at a time, so the default's peak memory does not grow with depth."""
    from .checkpoint import load
    from .engine.lazy import lazy_model
    from .engine.memory import trim
    from .eval.samples import generate, side_by_side
    from .models import DTYPES, load_model, resolve_model_path

    dense_path = resolve_model_path(model_spec)
    sizes = [_weight_bytes(str(tmp)), _weight_bytes(dense_path)]
    # a fixed size, not the memory free now: the same run makes the same choice (the samples are in the report)
    stream = device.type == "cpu" and None not in sizes and sum(sizes) > WHOLE_SAMPLES_BYTES

    def run(path: str, lrc: bool, whole):
        if stream:  # what the block loop and the checkpoint's writing freed goes back to the system first
            gc.collect()
            trim()
        if stream and (loaded := lazy_model(path, DTYPES[dtype], lrc=lrc)) is not None:
            model, lazy = loaded
            lazy.stream()
            try:
                return generate(model, tokenizer, n)
            finally:
                lazy.remove_hooks()
                lazy.unload_all()
        model = whole().to(device)
        try:
            return generate(model, tokenizer, n)
        finally:
            del model

    mine = run(str(tmp), True, lambda: load(tmp, dtype=dtype))
    dense = run(dense_path, False, lambda: load_model(model_spec, dtype)[0])
    record = side_by_side(tokenizer, mine, dense)
    if stream:
        record["streamed"] = True  # block by block: the whole models would have raised the peak memory
    return record
