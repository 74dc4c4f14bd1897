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
from .job import BlockJob, Run
from .lazy import LazyBlocks
from .lockstep import compress_lockstep, lockstep_applies
from .memory import trim
from .passes import run_pass
from .refine import refine_block
from .shared import SharedGroups
from .spectra import allocation_spectra, apply_global_allocation, gradient_needs, gradient_stats
from .stats import CrossGram, DenseInputs, attach, block_groups
from .stream import Host
from .streams import capture, load_tokens, make_streams, restore, stream_of, summary, to_device
from .quantize import quantize_block, quantize_embeddings
from .units import compress_units


def after_block(i: int) -> None:
    """Called once block ``i`` is finished and saved (a seam for tests that simulate a crash)."""


def compress_block(job: BlockJob) -> tuple[dict, list]:
    """Every stage of ``job.rows`` on ``job.block`` in place, then (with ``refine``) the block's refinement, then
    every stream's outputs; returns (specs, rows)."""
    dense_block = copy.deepcopy(job.block) if job.dense_io else None  # the block as it came: the dense stream's
    modules = dict(job.block.named_modules())
    source = dict(job.reference.named_modules()) if job.reference is not None else modules  # where W comes from
    job.originals = {r.name.removeprefix(job.prefix): effective_weight(source[r.name.removeprefix(job.prefix)])
                     .to(job.device) for r in job.rows if r.compensation}  # kept until the block's stages are done
    if lockstep_applies(job):  # one forward per batch (lockstep.py)
        groups = block_groups(job.block, job.main.x_in, job.main.dev_kwargs[job.index], job.device, job.wanted())
        compress_lockstep(job, groups)
    else:
        _stages(job, dense_block)
    if job.recipe.refine is not None:
        _refine(job, dense_block)
    if job.recipe.quantize is not None:  # last: stores what the stages (and refine) left, then re-propagates
        job.quantized = quantize_block(job, job.recipe.quantize)
    return job.specs, job.report


def _stages(job: BlockJob, dense_block) -> None:
    """Every stage of the block in turn (the path besides lockstep), then the streams' outputs unless refine follows."""
    eng, main, block, index = job.eng, job.main, job.block, job.index
    groups = block_groups(block, main.x_in, main.dev_kwargs[index], job.device, job.wanted())
    dense = (dense_block, *job.dense_io) if job.dense_io and eng.objective == "dense" else None
    if eng.propagate == "original" and len(job.streams) > 1:  # every stream's outputs from the untouched block
        for s in job.streams:
            run_pass(block, s.x_in, s.dev_kwargs[index], eng.batch_size, job.device, out=job.outs[s.name],
                     dense=dense if s is main else None)
            job.written.add(s.name)
    for si, stage in enumerate(job.recipe.stages):
        method = METHODS[stage.method](job.recipe.method_config(si))
        if method.unit == "block":  # groups of modules by role: engine/units.py
            urows = [r for r in job.rows if r.stage == si]
            if urows:
                compress_units(job, urows, method, groups, stream_of(job.streams, si))
                if any(r.stage > si for r in job.rows):  # modules were rebuilt: later stages need the new groups
                    groups = block_groups(block, main.x_in, main.dev_kwargs[index], job.device, job.wanted())
            continue
        _linear_stage(job, si, method, groups, dense, dense_block)
    if job.recipe.refine is not None:
        return  # the outputs come from the refined block (``_refine``)
    for s in job.streams:
        if s.name not in job.written:
            job.progress.phase("propagate" if len(job.streams) == 1 else f"propagate {s.name}")
            run_pass(block, s.x_in, s.dev_kwargs[index], eng.batch_size, job.device, out=job.outs[s.name],
                     dense=dense if s is main else None)


def _refine(job: BlockJob, dense_block) -> None:
    """AA-SVD's block refinement (``refine.py``): the dense block's outputs on the dense stream are the target, the
    compressed stream's inputs the data; then every stream's outputs from the block as refined."""
    eng, main, index = job.eng, job.main, job.index
    d_in, d_out = job.dense_io
    job.progress.phase("dense targets")
    run_pass(dense_block, d_in, main.dev_kwargs[index], eng.batch_size, job.device, out=d_out)
    replaced = {n.removeprefix(job.prefix) for n in job.specs}
    job.refined = refine_block(job.block, main.x_in, d_out, main.dev_kwargs[index], job.recipe.refine, index,
                               job.device, replaced, job.progress)
    for s in job.streams:
        job.progress.phase("propagate" if len(job.streams) == 1 else f"propagate {s.name}")
        run_pass(job.block, s.x_in, s.dev_kwargs[index], eng.batch_size, job.device, out=job.outs[s.name])


def _linear_stage(job: BlockJob, si: int, method, groups, dense, dense_block) -> None:
    """Stage ``si`` of a Linear method: per group of Linears reading one input (all at once unless sequential), the
    statistics from the stage's stream, stopped at the group's first module, then ``replace_group``."""
    eng, stage = job.eng, job.recipe.stages[si]
    rel = {r.name.removeprefix(job.prefix): r for r in job.rows if r.stage == si}
    modules = dict(job.block.named_modules())  # earlier stages replaced some
    owner = {n: g[0] for g in groups for n in g}
    targeted = [g for g in ([n for n in g if n in rel] for g in groups) if g]
    stream = stream_of(job.streams, si)
    for group in targeted if eng.sequential else ([[n for g in targeted for n in g]] if targeted else []):
        job.progress.phase(f"statistics {','.join(n.rsplit('.', 1)[-1] for n in group)}")
        own = {n: owner[n] for n in group}
        needs = set(method.needs) | {"input_gram"}  # the Gram also gives the report's weighted error
        collectors = attach(needs, modules, own)
        if dense:
            collectors.append(DenseInputs(dict(dense_block.named_modules()), own))
            collectors.append(CrossGram(modules, own, collectors[-1]))
        record = eng.propagate == "original" and stream.name not in job.written
        try:  # the statistics are the modules' inputs: stop when the last group's first module is called
            run_pass(job.block, stream.x_in, stream.dev_kwargs[job.index], eng.batch_size, job.device,
                     out=job.outs[stream.name] if record else None, stop=None if record else own[group[-1]],
                     dense=dense, before=True)
        finally:
            for c in collectors:
                c.remove()
        if record:
            job.written.add(stream.name)
        job.progress.phase(f"decompose {len(group)} module(s)")
        replace_group(job, group, rel, collectors, method, stage, modules.__getitem__, job.block.set_submodule)
        del collectors


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


def _open_cache(model, streams, recipe, cache_dir, device, reference, lazy, resume: bool, plan_only: bool
                ) -> RunCache:
    """The run cache of this model, calibration, recipe, lrc, torch and device type (a resume finds it again)."""
    fp = hashlib.sha256(model_fingerprint(model, lazy.state_items() if lazy else None).encode())
    for s in streams:
        fp.update(s.ids.numpy().tobytes())
    fp.update(str(recipe.resolved()).encode())
    # a cache written by another lrc or torch, or on another device type, may not give the same bytes
    fp.update(f"lrc {__version__} torch {torch.__version__} {device.type}".encode())
    if reference is not None:
        fp.update(model_fingerprint(reference).encode())
    cache = RunCache(cache_dir, fp.hexdigest(), resume or plan_only)
    if resume and not cache.existed:
        cache.clear()
        raise LrcError(f"--resume: no interrupted run matches this model, calibration, recipe, lrc {__version__}, "
                       f"torch {torch.__version__} and device {device.type} under {Path(cache_dir) / 'runs'}; "
                       "run without --resume to start fresh")
    return cache


def _restore(run: Run, resume: bool) -> int:
    """The first block to compress: 0, or on ``resume`` the first unfinished one when everything it needs is on disk;
    the finished blocks before it are restored exactly as they were saved (``run.specs``, ``run.report``)."""
    cache, n, hidden = run.cache, len(run.blocks), run.model.config.hidden_size
    done = cache.first_unfinished(n) if resume else 0
    cache.verify(done)  # a truncated or corrupted file is reported, never used
    start = 0
    if done == n:
        start = n
    elif done > 0 and restore(run.streams, cache, done, hidden, run.dtype):
        try:  # everything the first unfinished block needs must be on disk, else start over
            run.d_in = cache.acts(done, run.shape, run.dtype, stream="dense") if run.dense_stream else None
            start = done
        except FileNotFoundError:
            start = 0
    lazy = run.lazy
    held = SharedGroups(run.plan, run.recipe, cache).waiting_before(start) if lazy is not None else set()
    for i in range(start):  # resume: restore finished blocks exactly as they were saved
        if lazy is not None and i not in held:  # the weights stay in the run cache; the skeleton gets the structure
            info = cache.block_info(i)
            with torch.device("meta"):
                apply_structure(run.model, info["modules"])
        else:
            if lazy is not None:  # a shared group still open: its dictionary fit re-saves this block
                lazy.load(i)
            tensors, info = cache.load_block(i)
            apply_structure(run.model, info["modules"])
            run.blocks[i].load_state_dict(tensors)
        run.specs.update(info["modules"])
        run.report.extend(info["rows"])
        if "refine" in info:
            run.refined.append(info["refine"])
        run.quantized.extend(info.get("quantize", []))
    return start


def _block_step(run: Run, i: int, shared) -> None:
    """Compress block ``i``, fit the shared groups it completes, save it and hand its outputs on as the next inputs."""
    cache, streams, device, dtype, hidden = run.cache, run.streams, run.device, run.dtype, run.model.config.hidden_size
    run.progress.block(i)
    run.progress.phase("load")
    block = run.lazy.load(i, device) if run.lazy is not None else run.blocks[i].to(device)
    outs = {s.name: cache.acts(i + 1, s.shape(hidden), dtype, create=True, stream=s.name) for s in streams}
    d_out = cache.acts(i + 1, run.shape, dtype, create=True, stream="dense") if run.dense_stream else None
    job = BlockJob(block, i, f"{run.prefix}.{i}.", [r for r in run.plan if r.block == i], run.recipe, streams, outs,
                   device, run.progress, run.model.config, (run.d_in, d_out) if run.dense_stream else None, run.extra,
                   run.ref_blocks[i] if run.ref_blocks is not None else None, shared)
    bspecs, brows = compress_block(job)
    if shared is not None and shared.completed_at(i):
        _finish_shared(shared, i, block, run.blocks, run.prefix, cache, run.specs, run.report, bspecs, brows)
    run.progress.phase("save")
    run.blocks[i] = block.to("cpu")
    info = {"modules": bspecs, "rows": brows}
    if job.refined is not None:
        info["refine"] = job.refined
        run.refined.append(job.refined)
    if job.quantized is not None:
        info["quantize"] = job.quantized
        run.quantized.extend(job.quantized)
    cache.save_block(i, run.blocks[i].state_dict(), info)
    if shared is not None:
        shared.cleanup(i)
    if run.lazy is not None and (shared is None or not shared.open_at(i)):
        run.lazy.unload_all()  # this block, and the earlier ones of a shared group just finished
        trim()
    cache.drop_acts(i)
    for s in streams:
        s.x_in = outs[s.name]
    run.d_in = d_out
    # the block's input files are unlinked, but their mappings live as long as a tensor viewing them does: the
    # forward threads, hooks and closures of the block loop hold some in reference cycles, which only the cycle
    # collector frees. Collect now, or every earlier block's inputs stay resident (peak memory grew with depth)
    gc.collect()
    run.specs.update(bspecs)
    run.report.extend(brows)
    run.progress.block_done(i, brows)  # a log line per block when stderr is not a terminal
    after_block(i)


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
    progress.phase("calibration tokens")
    streams = make_streams(recipe)
    load_tokens(streams, model, tokenizer, Path(cache_dir), recipe.engine.batch_size)
    if lazy is not None:
        lazy.unload_all()  # self-generated calibration ran the whole model
    phases = {"calibration_tokens": time.perf_counter() - t_start}
    cache = _open_cache(model, streams, recipe, cache_dir, device, reference, lazy, resume, plan_only)
    run = Run(model, prefix, blocks, plan, recipe, cache, streams, device, progress, lazy,
              find_blocks(reference)[1] if reference is not None else None)
    if gradient_needs(recipe):  # on the dense model, before any finished block is restored
        t_f = time.perf_counter()
        run.extra = gradient_stats(run, Host(blocks, device, lazy))
        phases["gradients"] = time.perf_counter() - t_f
    start = _restore(run, resume)
    emb_specs, emb_rows = {}, []
    if recipe.quantize is not None and recipe.quantize.embeddings is not None:  # again on resume: same bytes
        progress.phase("quantize the embeddings")
        emb_specs, emb_rows = quantize_embeddings(model, recipe.quantize)
    if start == 0:
        progress.phase("capture block-0 inputs")
        capture(streams, model, blocks, cache, run.dtype, recipe.engine.batch_size, device)
        if run.dense_stream:
            run.d_in = cache.acts(0, run.shape, run.dtype, create=True, stream="dense")
            run.d_in.copy_(run.main.x_in)
    phases["capture"] = time.perf_counter() - t_start - sum(phases.values())
    to_device(streams, device)
    if any(st.allocator != "uniform" for st in recipe.stages):
        t_alloc = time.perf_counter()
        run.allocation = apply_global_allocation(plan, recipe, allocation_spectra(run), run)
        phases["allocation"] = time.perf_counter() - t_alloc
    if plan_only:
        progress.done()
        return {"plan": plan, "cache": cache, "allocation": run.allocation}
    shared = SharedGroups(plan, recipe, cache) or None
    if shared is not None and run.dense_stream:
        raise LrcError("engine.objective: dense and refine are not supported with shared dictionaries "
                       "(share: layers)")
    progress.start_blocks(len(blocks), start)
    for i in range(start, len(blocks)):
        _block_step(run, i, shared)
    progress.done()
    total = time.perf_counter() - t_start
    phases["blocks"] = total - sum(phases.values())
    return {"modules": {**emb_specs, **run.specs}, "rows": run.report, "cache": cache, "seconds": total,
            "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
            "block_phase_seconds": {k: round(v, 3) for k, v in progress.profile.items()},
            "calibration_tokens": int(run.main.ids.numel()), "calibration_streams": summary(streams),
            "device": str(device), "resumed_from_block": start, "refine": run.refined,
            "quantized": emb_rows + run.quantized,
            "allocation": run.allocation}
