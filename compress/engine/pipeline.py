"""The block loop. Only this module moves tensors between devices, reads the activation cache and orders work.

Per decoder block: load it on the device → discover its Linear groups → for each stage, for each group in call order
(sequential mode) run the stage's calibration stream through the block collecting the statistics the method needs
(stopping the forward once the group has run), decompose, replace → recompute every stream's outputs (from the
compressed block, or the original one with ``propagate: original``) into the next block's input files → save the
block and mark it finished.
"""
from __future__ import annotations

import copy
import hashlib
import gc
import time
from pathlib import Path

import torch

from ..calibration import check_context
from ..checkpoint.modeling_lrc import apply_structure
from ..errors import LrcError
from ..methods import METHODS
from ..plan import find_blocks, make_plan
from ..progress import Progress
from ..recipe import Recipe
from ..version import __version__
from .cache import RunCache, model_fingerprint
from .decompose import effective_weight, replace_group
from .device import resolve_device
from .lazy import LazyBlocks
from .lockstep import compress_lockstep, lockstep_applies
from .memory import trim
from .passes import run_pass
from .shared import SharedGroups
from .spectra import allocation_spectra, apply_global_allocation, gradient_needs, gradient_stats
from .stats import CrossGram, DenseInputs, attach, block_groups
from .stream import Host
from .streams import capture, load_tokens, make_streams, restore, stream_of, summary, to_device
from .units import compress_units


def after_block(i: int) -> None:
    """Called once block ``i`` is finished and saved (a seam for tests that simulate a crash)."""


def _wanted(rows, prefix) -> set[str]:
    """Module names (relative to the block) the rows act on: a Linear row's own, a unit row's members."""
    return {n.removeprefix(prefix) for r in rows for n in r.modules()}


def _compress_block(block, index, prefix, rows, recipe, streams, outs, device, progress,
                    dense_io=None, extra=None, reference=None, config=None, shared=None) -> tuple[dict, list]:
    eng = recipe.engine
    main = streams[0]
    groups = block_groups(block, main.x_in, main.dev_kwargs[index], device, _wanted(rows, prefix))
    modules = dict(block.named_modules())
    source = dict(reference.named_modules()) if reference is not None else modules  # where W comes from
    originals = {r.name.removeprefix(prefix): effective_weight(source[r.name.removeprefix(prefix)]).to(device)
                 for r in rows if r.compensation}  # this block's W, kept until its stages are done
    if lockstep_applies(rows, recipe, streams, dense_io, shared, config):  # one forward per batch (lockstep.py)
        return compress_lockstep(block, index, prefix, rows, recipe, main, outs[main.name], device, progress,
                                 groups, originals, extra)
    dense_block = copy.deepcopy(block) if dense_io else None
    dense = (dense_block, *dense_io) if dense_io else None
    owner = {n: g[0] for g in groups for n in g}
    specs, report = {}, []
    written: set[str] = set()
    if eng.propagate == "original" and len(streams) > 1:  # every stream's outputs from the untouched block
        for s in streams:
            run_pass(block, s.x_in, s.dev_kwargs[index], eng.batch_size, device, out=outs[s.name],
                     dense=dense if s is main else None)
            written.add(s.name)
    for si, stage in enumerate(recipe.stages):
        if METHODS[stage.method].unit == "block":  # groups of modules by role (MoDeGPT): engine/units.py
            urows = [r for r in rows if r.stage == si]
            if urows:
                s_specs, s_rows = compress_units(block, prefix, urows, METHODS[stage.method](recipe.method_config(si)),
                                                 config, groups, stream_of(streams, si), index, eng, device, outs,
                                                 written, progress, run_pass)
                specs.update(s_specs)
                report.extend(s_rows)
                if any(r.stage > si for r in rows):  # modules were rebuilt: later stages need the new groups
                    groups = block_groups(block, main.x_in, main.dev_kwargs[index], device, _wanted(rows, prefix))
                    owner = {n: g[0] for g in groups for n in g}
            continue
        rel = {r.name.removeprefix(prefix): r for r in rows if r.stage == si}
        modules = dict(block.named_modules())  # earlier stages replaced some
        targeted = [[n for n in g if n in rel] for g in groups]
        targeted = [g for g in targeted if g]
        if not targeted:
            continue
        method = METHODS[stage.method](recipe.method_config(si))
        stream = stream_of(streams, si)
        passes = targeted if eng.sequential else [[n for g in targeted for n in g]]
        for group in passes:
            progress.phase(f"statistics {','.join(n.rsplit('.', 1)[-1] for n in group)}")
            own = {n: owner[n] for n in group}
            needs = set(method.needs) | {"input_gram"}  # the Gram also gives the report's weighted error
            collectors = attach(needs, modules, own)
            if dense:
                collectors.append(DenseInputs(dict(dense_block.named_modules()), own))
                collectors.append(CrossGram(modules, own, collectors[-1]))
            record = eng.propagate == "original" and stream.name not in written
            try:  # the statistics are the modules' inputs: stop when the last group's first module is called
                run_pass(block, stream.x_in, stream.dev_kwargs[index], eng.batch_size, device,
                         out=outs[stream.name] if record else None, stop=None if record else own[group[-1]],
                         dense=dense, before=True)
            finally:
                for c in collectors:
                    c.remove()
            if record:
                written.add(stream.name)
            progress.phase(f"decompose {len(group)} module(s)")
            replace_group(group, rel, collectors, modules.__getitem__, block.set_submodule, method, stage, eng,
                          originals, extra, shared, specs, report)
            del collectors
    for s in streams:
        if s.name not in written:
            progress.phase("propagate" if len(streams) == 1 else f"propagate {s.name}")
            run_pass(block, s.x_in, s.dev_kwargs[index], eng.batch_size, device, out=outs[s.name],
                     dense=dense if s is main else None)
    return specs, report


def _finish_shared(shared, i, block, blocks, prefix, cache, specs, report, bspecs, brows) -> None:
    """Fit the shared dictionaries whose group ends at block ``i``; save the group's earlier blocks again with their
    new modules (their report rows move into their own block's record, replacing any from an earlier attempt)."""
    done = shared.finish(i, lambda j: block if j == i else blocks[j], prefix)
    for j, (s_specs, s_rows) in sorted(done.items()):
        names = {r["name"] for r in s_rows}
        report[:] = [r for r in report if r["name"] not in names]
        specs.update(s_specs)
        if j == i:
            bspecs.update(s_specs)
            brows.extend(s_rows)
            continue
        report.extend(s_rows)
        info = cache.block_info(j)  # its record only: the weights to save are the block in memory
        rows_j = [r for r in info["rows"] if r["name"] not in names] + s_rows
        cache.save_block(j, blocks[j].state_dict(), {"modules": {**info["modules"], **s_specs}, "rows": rows_j})


def compress_blocks(model, tokenizer, recipe: Recipe, cache_dir: Path, resume: bool = False,
                    progress: Progress | None = None, plan_only: bool = False, reference=None,
                    lazy: LazyBlocks | None = None) -> dict:
    """Compress ``model`` in place, block by block. Returns ``{"modules": specs, "rows": report, ...}``.

    With ``plan_only`` it stops once every rank is decided (global allocators included) and returns ``{"plan"}``.
    ``reference`` (a dense model with the same module names) supplies the original weights compensation stages
    repair towards, for a ``model`` compressed elsewhere; by default they are ``model``'s own weights.
    With ``lazy`` (``engine/lazy.py``) ``model`` is a meta-device skeleton: each block is read from the checkpoint
    when its turn comes and given back once saved to the run cache, whose block files then hold the result.
    """
    check_context(model, recipe)  # windows longer than the model's context: one line now, not an OOM later
    progress = progress or Progress(enabled=False)
    t_start = time.perf_counter()
    device = resolve_device(recipe.engine.device)
    plan = make_plan(model, recipe)
    prefix, blocks = find_blocks(model)
    dtype = next(model.parameters()).dtype
    hidden = model.config.hidden_size
    progress.phase("calibration tokens")
    streams = make_streams(recipe)
    load_tokens(streams, model, tokenizer, Path(cache_dir), recipe.engine.batch_size)
    if lazy is not None:
        lazy.unload_all()  # self-generated calibration ran the whole model
    main = streams[0]
    phases = {"calibration_tokens": time.perf_counter() - t_start}
    fp = hashlib.sha256(model_fingerprint(model, lazy.state_items() if lazy else None).encode())
    for s in streams:
        fp.update(s.ids.numpy().tobytes())
    fp.update(str(recipe.resolved()).encode())
    # a cache written by another lrc or torch, or on another device type, may not give the same bytes
    fp.update(f"lrc {__version__} torch {torch.__version__} {device.type}".encode())
    if reference is not None:
        fp.update(model_fingerprint(reference).encode())
    ref_blocks = find_blocks(reference)[1] if reference is not None else None
    cache = RunCache(cache_dir, fp.hexdigest(), resume or plan_only)
    if resume and not cache.existed:
        cache.clear()
        raise LrcError(f"--resume: no interrupted run matches this model, calibration, recipe, lrc {__version__}, "
                       f"torch {torch.__version__} and device {device.type} under {Path(cache_dir) / 'runs'}; "
                       "run without --resume to start fresh")
    extra: dict = {}
    if gradient_needs(recipe):  # on the dense model, before any finished block is restored
        t_f = time.perf_counter()
        extra = gradient_stats(model, prefix, blocks, streams, plan, recipe, cache, Host(blocks, device, lazy),
                               progress)
        phases["gradients"] = time.perf_counter() - t_f
    shape = main.shape(hidden)
    n = len(blocks)
    dense_stream = recipe.engine.objective == "dense"
    start, d_in = 0, None
    done = cache.first_unfinished(n) if resume else 0
    cache.verify(done)  # a truncated or corrupted file is reported, never used
    if done == n:
        start = n
    elif done > 0 and restore(streams, cache, done, hidden, dtype):
        try:  # everything the first unfinished block needs must be on disk, else start over
            d_in = cache.acts(done, shape, dtype, stream="dense") if dense_stream else None
            start = done
        except FileNotFoundError:
            start = 0
    specs: dict = {}
    report: list = []
    held = SharedGroups(plan, recipe, cache).waiting_before(start) if lazy is not None else set()
    for i in range(start):  # resume: restore finished blocks exactly as they were saved
        if lazy is not None and i not in held:  # the weights stay in the run cache; the skeleton gets the structure
            info = cache.block_info(i)
            with torch.device("meta"):
                apply_structure(model, info["modules"])
        else:
            if lazy is not None:  # a shared group still open: its dictionary fit re-saves this block
                lazy.load(i)
            tensors, info = cache.load_block(i)
            apply_structure(model, info["modules"])
            blocks[i].load_state_dict(tensors)
        specs.update(info["modules"])
        report.extend(info["rows"])
    if start == 0:
        progress.phase("capture block-0 inputs")
        capture(streams, model, blocks, cache, dtype, recipe.engine.batch_size, device)
        if dense_stream:
            d_in = cache.acts(0, shape, dtype, create=True, stream="dense")
            d_in.copy_(main.x_in)
    phases["capture"] = time.perf_counter() - t_start - sum(phases.values())
    to_device(streams, device)
    if any(st.allocator != "uniform" for st in recipe.stages):
        t_alloc = time.perf_counter()
        spectra = allocation_spectra(model, blocks, prefix, plan, recipe, cache, main.x_in, shape, dtype,
                                     main.dev_kwargs, device, progress, extra, main.ids, ref_blocks, lazy)
        apply_global_allocation(plan, recipe, spectra)
        phases["allocation"] = time.perf_counter() - t_alloc
    if plan_only:
        progress.done()
        return {"plan": plan, "cache": cache}
    shared = SharedGroups(plan, recipe, cache) or None
    if shared is not None and dense_stream:
        raise LrcError("engine.objective: dense is not supported with shared dictionaries (share: layers)")
    progress.start_blocks(n, start)
    for i in range(start, n):
        progress.block(i)
        progress.phase("load")
        block = lazy.load(i, device) if lazy is not None else blocks[i].to(device)
        outs = {s.name: cache.acts(i + 1, s.shape(hidden), dtype, create=True, stream=s.name) for s in streams}
        d_out = cache.acts(i + 1, shape, dtype, create=True, stream="dense") if dense_stream else None
        rows = [r for r in plan if r.block == i]
        bspecs, brows = _compress_block(block, i, f"{prefix}.{i}.", rows, recipe, streams, outs, device,
                                        progress, (d_in, d_out) if dense_stream else None, extra,
                                        ref_blocks[i] if ref_blocks is not None else None, model.config, shared)
        if shared is not None and shared.completed_at(i):
            _finish_shared(shared, i, block, blocks, prefix, cache, specs, report, bspecs, brows)
        progress.phase("save")
        blocks[i] = block.to("cpu")
        cache.save_block(i, blocks[i].state_dict(), {"modules": bspecs, "rows": brows})
        if shared is not None:
            shared.cleanup(i)
        if lazy is not None and (shared is None or not shared.open_at(i)):
            lazy.unload_all()  # this block, and the earlier ones of a shared group just finished
            trim()
        cache.drop_acts(i)
        for s in streams:
            s.x_in = outs[s.name]
        d_in = d_out
        # the block's input files are unlinked, but their mappings live as long as a tensor viewing them does: the
        # forward threads, hooks and closures of the block loop hold some in reference cycles, which only the cycle
        # collector frees. Collect now, or every earlier block's inputs stay resident (peak memory grew with depth)
        gc.collect()
        specs.update(bspecs)
        report.extend(brows)
        progress.block_done(i, brows)  # a log line per block when stderr is not a terminal
        after_block(i)
    progress.done()
    total = time.perf_counter() - t_start
    phases["blocks"] = total - sum(phases.values())
    return {"modules": specs, "rows": report, "cache": cache, "seconds": total,
            "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
            "block_phase_seconds": {k: round(v, 3) for k, v in progress.profile.items()},
            "calibration_tokens": int(main.ids.numel()), "calibration_streams": summary(streams),
            "device": str(device), "resumed_from_block": start}
