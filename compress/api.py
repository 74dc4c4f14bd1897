"""The Python surface: ``compress_model`` (in memory), ``compress`` (MODEL → checkpoint directory), ``plan``, ``load``.

The CLI is a thin layer over these functions.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import yaml

from .version import __version__
from .checkpoint import load, save_checkpoint
from .checkpoint.modeling_lrc import LRC_FORMAT_VERSION
from .checkpoint.save import base_of, save_checkpoint_streamed
from .engine.lazy import lazy_model
from .engine.pipeline import compress_blocks
from .errors import LrcError
from .methods import METHODS
from .models import DTYPES, cache_root, is_lrc_checkpoint, load_model, resolve_model_path
from .output import atomic_dir, check_out
from .plan import PlanRow, make_plan
from .progress import Progress
from .recipe import Recipe, load_recipe, parse_recipe
from .report import build_report, checkpoint_bytes, count_params, peak_rss_gib, write_report

__all__ = ["compress_model", "compress", "compensate", "save", "plan", "load", "with_overrides",
           "with_stage_calibration"]


def with_overrides(recipe: Recipe, source: str = "recipe", **overrides) -> Recipe:
    """A copy of ``recipe`` with ``section.field`` overrides applied (e.g. ``calibration__dataset="x.jsonl"``),
    validated again so a bad override gets the same one-line error as a bad recipe."""
    data = recipe.model_dump(mode="json")
    for key, value in overrides.items():
        if value is None:
            continue
        section, field = key.split("__")
        if data.get(section) is None:
            raise LrcError(f"{source}: has no {section} section for --{section}-{field.replace('_', '-')}")
        data[section][field] = value
        if key == "calibration__dataset":
            data["calibration"]["mix"] = None  # a dataset given on the command line replaces a recipe's mix
    return parse_recipe(data, source)


def with_stage_calibration(recipe: Recipe, sources: list[str], source: str = "recipe") -> Recipe:
    """A copy of ``recipe`` where ``INDEX=DATASET`` items set stage INDEX's own calibration dataset (keeping its
    samples/seq_len, or the recipe's when the stage had no set of its own), e.g. ``1=ARC-Easy-Dev.jsonl``."""
    data = recipe.model_dump(mode="json")
    for item in sources:
        index, sep, dataset = item.partition("=")
        if not sep or not index.isdigit() or int(index) >= len(data["stages"]):
            raise LrcError(f"--stage-calib: {item!r} is not INDEX=DATASET with INDEX < {len(data['stages'])}")
        stage = data["stages"][int(index)]
        stage["calibration"] = {**(stage.get("calibration") or data["calibration"]), "dataset": dataset, "mix": None}
    return parse_recipe(data, source)


def compress_model(model, recipe: Recipe | str | Path, tokenizer=None, cache_dir: str | Path | None = None,
                   resume: bool = False, progress: bool = False, keep_cache: bool = False, reference=None,
                   lazy=None) -> dict:
    """Compress ``model`` in place following ``recipe``; return the report (parameter accounting, module rows).

    The module structure is recorded in ``model.config.lrc`` so that ``save(model, tokenizer, out, report)`` writes a
    checkpoint that reloads anywhere. The activation cache is removed on success unless ``keep_cache``.
    ``lazy``: ``model`` is a meta-device skeleton (``engine/lazy.py``) whose blocks end in the run cache only.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
    before = count_params(model)
    bar = Progress(enabled=progress)
    try:
        result = compress_blocks(model, tokenizer, recipe, Path(cache_dir or cache_root()), resume, bar,
                                 reference=reference, lazy=lazy)
    finally:
        bar.close()
    previous = getattr(model.config, "lrc", None) or {}
    base_type, base_arch = base_of(model)  # a loaded lrc checkpoint is a subclass of its base: record the base
    model.config.lrc = {"format_version": LRC_FORMAT_VERSION, "base_model_type": base_type,
                        "base_architecture": base_arch, "modules": {**previous.get("modules", {}), **result["modules"]}}
    if not keep_cache:
        result["cache"].clear()
    return build_report(result["rows"], before, count_params(model), {
        "lrc_version": __version__, "model": getattr(model.config, "_name_or_path", ""),
        "recipe": recipe.resolved(), "device": result["device"], "seconds": round(result["seconds"], 3),
        "phase_seconds": result["phase_seconds"], "block_phase_seconds": result["block_phase_seconds"],
        "calibration_tokens": result["calibration_tokens"], "calibration_streams": result["calibration_streams"],
        "resumed_from_block": result["resumed_from_block"],
        **({"refine": _refine_summary(result["refine"])} if result.get("refine") else {}),
        **({"quantization": _quant_summary(result["quantized"], recipe)} if result.get("quantized") else {}),
        **({"allocation": {str(k): v for k, v in result["allocation"].items()}} if result.get("allocation") else {}),
        "run_cache": str(result["cache"].dir), "torch": torch.__version__,
    }, bytes_per_param=next(model.parameters()).element_size())


def _quant_summary(rows: list[dict], recipe) -> dict:
    """The report's ``quantization`` section: the recipe's settings, every matrix (``engine/quantize.py``; the
    embeddings and an untied head first, with their ``kind``) and the totals (bytes of the quantized matrices before
    and after, a tied head's table counted once; their mean error)."""
    before, after = sum(r["bytes_before"] for r in rows), sum(r["bytes_after"] for r in rows)
    emb = [r for r in rows if r.get("kind")]
    return {"settings": recipe.quantize.model_dump(mode="json"), "matrices": len(rows),
            "bytes_before": before, "bytes_after": after, "kept_bytes_fraction": after / before if before else None,
            "mean_rel_error": sum(r["rel_error"] for r in rows) / len(rows),
            **({"embeddings": {"bytes_before": sum(r["bytes_before"] for r in emb),
                               "bytes_after": sum(r["bytes_after"] for r in emb)}} if emb else {}),
            "seconds": round(sum(r.get("block_seconds", 0.0) for r in rows) + sum(r.get("seconds", 0.0) for r in emb),
                             3), "rows": rows}


def _refine_summary(blocks: list[dict]) -> dict:
    """The report's ``refine`` section: per block MSE before and after (``engine/refine.py``) and the totals."""
    kept = [b for b in blocks if b["kept"]]
    return {"blocks": blocks, "kept": len(kept), "of": len(blocks),
            "mean_mse_before": sum(b["mse_before"] for b in blocks) / len(blocks),
            "mean_mse_after": sum(b["mse_after"] for b in blocks) / len(blocks),
            "seconds": round(sum(b["seconds"] for b in blocks), 3)}


def save(model, tokenizer, out: str | Path, report: dict | None = None, overwrite: bool = False) -> Path:
    """Write a compressed model as a checkpoint directory, atomically (``compress/output.py``: a temporary directory
    beside ``out``, moved into place at the end; an existing ``out`` is replaced without a moment where neither the
    old nor the new checkpoint is whole). Missing parent directories are created."""
    out = Path(out)
    with atomic_dir(out, overwrite) as tmp:
        save_checkpoint(model, tokenizer, tmp)
        if report is not None:
            (tmp / "lrc_recipe.yaml").write_text(yaml.safe_dump(report["recipe"], sort_keys=False))
            write_report(tmp, report)
    return out


def compress(model: str, recipe: Recipe | str | Path, out: str | Path, resume: bool = False,
             overwrite: bool = False, cache_dir: str | Path | None = None, progress: bool = True,
             keep_cache: bool = False, return_model: bool = True) -> tuple[object, dict]:
    """Load MODEL, compress it, write the checkpoint to ``out``; return ``(compressed model, report)``.

    A local safetensors model is loaded lazily (``engine/lazy.py``: one decoder block in memory at a time) and the
    checkpoint is written from the run cache shard by shard, so memory does not grow with depth. The recipe's
    evaluation runs on the checkpoint as written. The returned model is that checkpoint loaded back (None with
    ``return_model=False``, which the CLI uses: a model larger than RAM is never loaded whole)."""
    t0 = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out)
    check_out(out, overwrite or resume)
    if recipe.eval is not None:
        from .eval.run import preflight

        preflight(recipe.eval)  # fail on a missing eval file now, not after the compression
    if recipe.finetune is not None and recipe.finetune.data != "selfgen":
        from .finetune.data import check_source

        check_source(recipe.finetune.data)  # likewise a missing training file
    path = resolve_model_path(model)
    loaded = None if is_lrc_checkpoint(path) else lazy_model(path, DTYPES[recipe.model.dtype])
    if loaded is not None:
        from transformers import AutoTokenizer

        (net, lazy), tokenizer = loaded, AutoTokenizer.from_pretrained(path)
    else:
        (net, tokenizer, _), lazy = load_model(model, recipe.model.dtype), None
    from .finish import finish

    report = compress_model(net, recipe, tokenizer, cache_dir, resume, progress, keep_cache=True, lazy=lazy)
    report["model"], report["total_seconds"] = model, round(time.perf_counter() - t0, 3)
    cache_dir_run = Path(report["run_cache"])
    blocks = _cached_blocks(cache_dir_run, net)
    with atomic_dir(out, overwrite=True) as tmp:
        save_checkpoint_streamed(net, tokenizer, tmp, blocks)
        del net
        finish(tmp, model, tokenizer, recipe, report, out, resume, progress)
        (tmp / "lrc_recipe.yaml").write_text(yaml.safe_dump(report["recipe"], sort_keys=False))
        report["checkpoint_bytes"] = checkpoint_bytes(tmp)
        report["total_seconds"] = round(time.perf_counter() - t0, 3)  # fine-tuning, evaluation, samples included
        report["peak_rss_gib"] = round(peak_rss_gib(), 3)  # the checkpoint written (and evaluated) included
        write_report(tmp, report)
    if not keep_cache:
        shutil.rmtree(cache_dir_run, ignore_errors=True)
    return (load(out, dtype=recipe.model.dtype) if return_model else None), report


def _cached_blocks(run_dir: Path, model):
    """Each finished block's file in the run cache, as a source of tensors named as in ``model``."""
    from .checkpoint.shards import file_source
    from .plan import find_blocks

    prefix, blocks = find_blocks(model)
    return [file_source(run_dir / f"block_{i}.safetensors", f"{prefix}.{i}.") for i in range(len(blocks))]


def compensate(dense: str, compressed: str, out: str | Path, rank: int | None = None,
               param_ratio: float | None = None, calibration: dict | None = None, export: str = "lrc",
               overwrite: bool = False, cache_dir: str | Path | None = None, progress: bool = True,
               dtype: str = "float32", allocator: str = "uniform", method: str | None = None
               ) -> tuple[object, dict]:
    """A compensation method (EoRA) on a model compressed elsewhere: residual paths that repair COMPRESSED towards
    DENSE (modules matched by name, statistics from COMPRESSED's own activations). ``method``: a registered method of
    kind ``compensation`` (default: the only one). ``export``: ``lrc`` writes a checkpoint (the compressed model plus
    the paths), ``peft`` a LoRA adapter for the compressed base. ``allocator`` ``loss`` or ``energy`` spreads a
    ``param_ratio`` of extra parameters over the modules by their whitened residual spectra
    (``compress/allocation/residual.py``) instead of the same ratio everywhere."""
    import json

    from .checkpoint.peft_export import export_peft

    able = [n for n, m in METHODS.items() if m.kind == "compensation"]
    if method is None and len(able) != 1 or method is not None and method not in able:
        raise LrcError(f"lrc compensate: name the compensation method, one of {', '.join(able)}")
    method = method or able[0]
    budget = {"rank": rank} if rank is not None else {"param_ratio": param_ratio}
    recipe = parse_recipe({"name": method, "calibration": calibration or {}, "model": {"dtype": dtype},
                           "stages": [{"method": method, **budget, "allocator": allocator}], "samples": 0},
                          "lrc compensate")
    out = Path(out)
    check_out(out, overwrite)
    reference, _, _ = load_model(dense, dtype)
    net, tokenizer, path = load_model(compressed, dtype)
    from .plan import find_blocks, linear_units

    prefix, blocks = find_blocks(net)
    names = dict(reference.named_modules())
    missing = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n, _ in linear_units(b)
               if f"{prefix}.{i}.{n}" not in names]
    if missing:
        raise LrcError(f"{dense}: has no module {missing[0]} of {compressed} (modules are matched by name)")
    _check_same_shapes(net, names, prefix, dense, compressed)
    report = compress_model(net, recipe, tokenizer, cache_dir, progress=progress, reference=reference)
    report.update({"model": compressed, "reference": dense})
    if export == "peft":
        with atomic_dir(out, overwrite=True) as tmp:  # the temporary directory is removed on any failure
            export_peft(net, tmp, str(path))
            (tmp / "lrc_report.json").write_text(json.dumps(report, indent=2))
    else:
        save(net, tokenizer, out, report, overwrite=True)
    return net, report


def _check_same_shapes(net, dense_modules: dict, prefix: str, dense: str, compressed: str) -> None:
    """EoRA repairs ``W − W_c`` of one shape: a module whose input or output size differs from the dense module of
    its name (MoDeGPT's resized Linears, its attention's shrunk q/k/v/o) is refused in one line, before any work."""
    for name, mod in net.named_modules():
        if not name.startswith(prefix + ".") or not hasattr(mod, "in_features"):
            continue
        ref = dense_modules.get(name)
        mine = (mod.out_features, mod.in_features)
        theirs = (getattr(ref, "out_features", None), getattr(ref, "in_features", None))
        if ref is not None and mine != theirs:
            raise LrcError(f"{compressed}: {name} is {mine[0]}×{mine[1]} but {theirs[0]}×{theirs[1]} in {dense} "
                           "(a resized module, e.g. MoDeGPT's); EoRA repairs a module towards the dense module of "
                           "the same shape")


def plan(model: str, recipe: Recipe | str | Path, cache_dir: str | Path | None = None,
         progress: bool = False) -> list[PlanRow]:
    """Ranks and parameter counts per targeted module. Uniform budgets need the config alone (no weights are
    loaded); global allocators (energy, welore, loss) load the model and compute the spectra they read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if any(s.allocator != "uniform" for s in recipe.stages):
        net, tokenizer, _ = load_model(model, recipe.model.dtype)
        bar = Progress(enabled=progress)
        try:
            result = compress_blocks(net, tokenizer, recipe, Path(cache_dir or cache_root()), progress=bar,
                                     plan_only=True)
        finally:
            bar.close()
        if not result["cache"].existed:  # never delete an interrupted run's cache that --resume still needs
            result["cache"].clear()
        return result["plan"]
    path = resolve_model_path(model)
    if is_lrc_checkpoint(path):  # its own model type: the structure comes from lrc's loader, not AutoModel
        from .checkpoint import load_config
        from .checkpoint.modeling_lrc import LrcForCausalLM

        with torch.device("meta"):
            net = LrcForCausalLM._from_config(load_config(path))
        return make_plan(net, recipe)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise LrcError(f"{model}: cannot load model config ({str(err).splitlines()[0]})") from None
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    return make_plan(net, recipe)

