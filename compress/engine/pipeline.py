"""The block loop. Only this module moves tensors between devices, reads the activation cache and orders work.

Per decoder block: load it on the device → discover its Linear groups → for each stage, for each group in call order
(sequential mode) run the cached inputs through the block collecting the statistics the method needs (stopping the
forward once the group has run), decompose, replace → recompute the block's outputs (from the compressed block, or the
original one with ``propagate: original``) into the next block's input file → save the block and mark it finished.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..calibration import calibration_tokens
from ..checkpoint.modeling_lrc import apply_structure
from ..methods import METHODS
from ..plan import find_blocks, make_plan
from ..progress import Progress
from ..recipe import Recipe
from .cache import RunCache, model_fingerprint
from .capture import StopForward, capture_block_inputs, map_tensors
from .decompose import decompose, lowrank_spec
from .stats import attach, discover_groups, stop_after


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def after_block(i: int) -> None:
    """Called once block ``i`` is finished and saved (a seam for tests that simulate a crash)."""


@torch.no_grad()
def run_pass(block, x_in, kwargs, batch_size, device, out=None, stop_module=None) -> None:
    """Stream the cached inputs through ``block``; write outputs to ``out`` or stop after ``stop_module``."""
    handle = stop_after(stop_module) if stop_module is not None else None
    try:
        for s in range(0, x_in.shape[0], batch_size):
            x = x_in[s : s + batch_size].to(device)
            try:
                y = block(x, **kwargs)
            except StopForward:
                continue
            y = y[0] if isinstance(y, (tuple, list)) else y
            out[s : s + batch_size] = y.to("cpu", out.dtype)
    finally:
        if handle is not None:
            handle.remove()


def _compress_block(block, prefix, rows, recipe, x_in, x_out, kwargs, device, progress) -> tuple[dict, list]:
    eng = recipe.engine
    rel = {r.name.removeprefix(prefix): r for r in rows}
    groups = discover_groups(block, x_in[:1].to(device), kwargs)
    modules = dict(block.named_modules())
    owner = {n: g[0] for g in groups for n in g}
    specs, report = {}, []
    wrote_outputs = False
    for si, stage in enumerate(recipe.stages):
        targeted = [[n for n in g if n in rel and rel[n].stage == si] for g in groups]
        targeted = [g for g in targeted if g]
        if not targeted:
            continue
        method = METHODS[stage.method](recipe.method_config(si))
        passes = targeted if eng.sequential else [[n for g in targeted for n in g]]
        for group in passes:
            progress.phase(f"statistics {','.join(n.rsplit('.', 1)[-1] for n in group)}")
            needs = set(method.needs) | {"input_gram"}  # the Gram also gives the report's weighted error
            collectors = attach(needs, modules, {n: owner[n] for n in group})
            record = eng.propagate == "original" and not wrote_outputs
            try:
                run_pass(block, x_in, kwargs, eng.batch_size, device, out=x_out if record else None,
                         stop_module=None if record else modules[group[-1]])
            finally:
                for c in collectors:
                    c.remove()
            wrote_outputs |= record
            progress.phase(f"decompose {len(group)} module(s)")
            for n in group:
                stats = {c.name: c.result(n) for c in collectors}
                new, info = decompose(method, modules[n], stats, rel[n], stage)
                report.append(info)
                if new is not None:
                    block.set_submodule(n, new)
                    specs[rel[n].name] = lowrank_spec(new)
            del collectors
    if not wrote_outputs:
        progress.phase("propagate")
        run_pass(block, x_in, kwargs, eng.batch_size, device, out=x_out)
    return specs, report


def compress_blocks(model, tokenizer, recipe: Recipe, cache_dir: Path, resume: bool = False,
                    progress: Progress | None = None) -> dict:
    """Compress ``model`` in place, block by block. Returns ``{"modules": specs, "rows": report, ...}``."""
    progress = progress or Progress(enabled=False)
    t_start = time.perf_counter()
    device = resolve_device(recipe.engine.device)
    plan = make_plan(model, recipe)
    prefix, blocks = find_blocks(model)
    dtype = next(model.parameters()).dtype
    progress.phase("calibration tokens")
    ids = calibration_tokens(model, tokenizer, recipe.calibration, Path(cache_dir), recipe.engine.batch_size)
    fp = model_fingerprint(model) + str(ids.sum().item()) + str(recipe.resolved())
    import hashlib

    cache = RunCache(cache_dir, hashlib.sha256(fp.encode()).hexdigest(), resume)
    shape = (ids.shape[0], ids.shape[1], model.config.hidden_size)
    n = len(blocks)
    start = cache.first_unfinished(n) if resume else 0
    kwargs = cache.load_kwargs()
    specs: dict = {}
    report: list = []
    for i in range(start):  # resume: restore finished blocks exactly as they were saved
        tensors, info = cache.load_block(i)
        apply_structure(model, info["modules"])
        blocks[i].load_state_dict(tensors)
        specs.update(info["modules"])
        report.extend(info["rows"])
    try:
        x_in = cache.acts(start, shape, dtype) if start < n else None
    except FileNotFoundError:
        x_in, start = None, 0
    if start == 0 and (x_in is None or kwargs is None):
        progress.phase("capture block-0 inputs")
        x_in = cache.acts(0, shape, dtype, create=True)
        kwargs = capture_block_inputs(model, blocks, ids, x_in, recipe.engine.batch_size, device)
        cache.save_kwargs(kwargs)
    dev_kwargs = map_tensors(kwargs, lambda t: t.to(device))
    progress.start_blocks(n, start)
    for i in range(start, n):
        progress.block(i)
        block = blocks[i].to(device)
        x_out = cache.acts(i + 1, shape, dtype, create=True)
        rows = [r for r in plan if r.block == i]
        bspecs, brows = _compress_block(block, f"{prefix}.{i}.", rows, recipe, x_in, x_out, dev_kwargs, device,
                                        progress)
        blocks[i] = block.to("cpu")
        cache.save_block(i, blocks[i].state_dict(), {"modules": bspecs, "rows": brows})
        cache.drop_acts(i)
        specs.update(bspecs)
        report.extend(brows)
        x_in = x_out
        after_block(i)
    progress.done()
    return {"modules": specs, "rows": report, "cache": cache, "seconds": time.perf_counter() - t_start,
            "calibration_tokens": int(ids.numel()), "device": str(device), "resumed_from_block": start}
