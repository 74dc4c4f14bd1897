"""The Python surface: ``compress_model`` (in memory), ``compress`` (MODEL → checkpoint directory), ``plan``, ``load``.

The CLI is a thin layer over these functions.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from . import __version__
from .checkpoint import load, save_checkpoint
from .engine.pipeline import compress_blocks
from .errors import LrcError
from .models import cache_root, load_model, resolve_model_path
from .plan import PlanRow, make_plan
from .progress import Progress
from .recipe import Recipe, dump_recipe, load_recipe, parse_recipe
from .report import build_report, count_params, write_report

__all__ = ["compress_model", "compress", "plan", "load", "with_overrides"]


def with_overrides(recipe: Recipe, source: str = "recipe", **overrides) -> Recipe:
    """A copy of ``recipe`` with ``section.field`` overrides applied (e.g. ``calibration__dataset="x.jsonl"``),
    validated again so a bad override gets the same one-line error as a bad recipe."""
    data = recipe.model_dump(mode="json")
    for key, value in overrides.items():
        if value is None:
            continue
        section, field = key.split("__")
        data[section][field] = value
    return parse_recipe(data, source)


def compress_model(model, recipe: Recipe | str | Path, tokenizer=None, cache_dir: str | Path | None = None,
                   resume: bool = False, progress: bool = False) -> dict:
    """Compress ``model`` in place following ``recipe``; return the report (parameter accounting, module rows)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
    before = count_params(model)
    bar = Progress(enabled=progress)
    try:
        result = compress_blocks(model, tokenizer, recipe, Path(cache_dir or cache_root()), resume, bar)
    finally:
        bar.close()
    report = build_report(result["rows"], before, count_params(model), {
        "lrc_version": __version__, "model": getattr(model.config, "_name_or_path", ""),
        "recipe": recipe.resolved(), "device": result["device"], "seconds": round(result["seconds"], 3),
        "calibration_tokens": result["calibration_tokens"], "resumed_from_block": result["resumed_from_block"],
        "torch": torch.__version__,
    })
    report["_modules_spec"] = result["modules"]
    report["_cache"] = result["cache"]
    return report


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise LrcError(f"{out}: output directory exists (use --overwrite to replace it)")
    if not out.parent.exists():
        raise LrcError(f"{out.parent}: parent directory of --out does not exist")


def compress(model: str, recipe: Recipe | str | Path, out: str | Path, resume: bool = False,
             overwrite: bool = False, cache_dir: str | Path | None = None, progress: bool = True,
             keep_cache: bool = False) -> dict:
    """Load MODEL, compress it, and write the checkpoint to ``out`` (atomically: temp dir, then rename)."""
    t0 = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out)
    _check_out(out, overwrite or resume)
    net, tokenizer, path = load_model(model, recipe.model.dtype)
    report = compress_model(net, recipe, tokenizer, cache_dir, resume, progress)
    modules, cache = report.pop("_modules_spec"), report.pop("_cache")
    report["model"], report["total_seconds"] = model, round(time.perf_counter() - t0, 3)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_checkpoint(net, tokenizer, tmp, modules, {"source_model": model})
        (tmp / "lrc_recipe.yaml").write_text(dump_recipe(recipe))
        write_report(tmp, report)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not keep_cache:
        cache.clear()
    report["model_obj"] = net
    return report


def plan(model: str, recipe: Recipe | str | Path) -> list[PlanRow]:
    """Ranks and parameter counts per targeted module, from the config alone (no weights are loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise LrcError(f"{model}: cannot load model config ({str(err).splitlines()[0]})") from None
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    return make_plan(net, recipe)


load = load
