"""What ``lrc compress`` does with the checkpoint once its blocks are written, before the checkpoint is moved into
place: the recipe's recovery fine-tuning (``finetune``: the model trained and written again), its evaluation
(``eval``) and the sample generations (``samples``, dense beside compressed), in that order, each on the checkpoint
as written. Each of them holds the model whole in memory; a recipe without them (``samples: 0``) keeps the
memory of a compression independent of depth."""
from __future__ import annotations

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
    from .engine.pipeline import resolve_device
    from .models import load_model
    from .progress import Progress

    device = resolve_device(recipe.engine.device)  # where it was compressed
    dtype = recipe.model.dtype
    written = load(tmp, dtype=dtype)
    if recipe.finetune is not None:
        from .finetune import state_dir, train_model

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
