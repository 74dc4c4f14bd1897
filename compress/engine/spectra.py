"""Statistics that must exist before the block loop: Fisher sums (FWSVD) and the spectra global allocators read.

``allocation_spectra`` runs the dense model block by block over the cached calibration inputs (original
propagation: every block sees the dense model's activations, as the budget is decided before anything changes),
collects each stage's statistics, and keeps only each targeted matrix's singular values — the allocator's input.
Both results are cached in the run directory so an interrupted run resumes without recomputing them.
"""
from __future__ import annotations

import torch

from ..allocation import SPECTRUM, allocate_global
from ..methods import METHODS
from .fisher import fisher_sums
from .stats import attach, discover_groups


def needs_fisher(recipe) -> bool:
    return any("fisher" in METHODS[s.method](recipe.method_config(i)).needs for i, s in enumerate(recipe.stages))


def fisher_stats(model, ids, plan, recipe, cache, device, progress) -> dict[str, torch.Tensor]:
    cached = cache.load_tensors("fisher")
    if cached is not None:
        return cached
    names = [r.name for r in plan if "fisher" in METHODS[r.method](recipe.method_config(r.stage)).needs]
    progress.phase("fisher (backward passes)")
    sums = fisher_sums(model, ids, names, device, batch_size=1, progress=progress)
    cache.save_tensors("fisher", sums)
    return sums


@torch.no_grad()
def _block_spectra(block, prefix, rows, recipe, x_in, x_out, kwargs, device, extra) -> dict[str, torch.Tensor]:
    from .pipeline import run_pass  # the one place that streams activations through a block

    rel = {r.name.removeprefix(prefix): r for r in rows}
    modules = dict(block.named_modules())
    groups = discover_groups(block, x_in[:1].to(device), kwargs)
    owner = {n: g[0] for g in groups for n in g if n in rel}
    methods = {si: METHODS[s.method](recipe.method_config(si)) for si, s in enumerate(recipe.stages)}
    needs = set().union(*(set(methods[r.stage].needs) for r in rows if SPECTRUM[recipe.stages[r.stage].allocator]
                          == "method")) - {"fisher"}
    collectors = attach(needs, modules, owner) if needs else []
    try:
        run_pass(block, x_in, kwargs, recipe.engine.batch_size, device, out=x_out)
    finally:
        for c in collectors:
            c.remove()
    out = {}
    for n, r in rel.items():
        W = modules[n].weight.detach().double()
        if SPECTRUM[recipe.stages[r.stage].allocator] == "weights":
            out[r.name] = torch.linalg.svdvals(W).cpu()
        else:
            stats = {c.name: c.result(n) for c in collectors}
            stats.update(extra.get(r.name, {}))
            out[r.name] = methods[r.stage].spectrum(W, stats).sigma.cpu()
    return out


def allocation_spectra(blocks, prefix, plan, recipe, cache, x0, shape, dtype, kwargs, device, progress,
                       extra) -> dict[str, torch.Tensor]:
    """Singular values of every matrix whose stage uses a global allocator (cached as ``spectra.safetensors``)."""
    cached = cache.load_tensors("spectra")
    if cached is not None:
        return cached
    rows = [r for r in plan if recipe.stages[r.stage].allocator != "uniform"]
    if not rows:
        return {}
    spectra: dict[str, torch.Tensor] = {}
    data_free = all(SPECTRUM[recipe.stages[r.stage].allocator] == "weights" for r in rows)
    x_in = x0
    for i, block in enumerate(blocks):
        brows = [r for r in rows if r.block == i]
        progress.phase(f"spectra for allocation, block {i + 1}/{len(blocks)}")
        block.to(device)
        if data_free:
            modules = dict(block.named_modules())
            spectra.update({r.name: torch.linalg.svdvals(modules[r.name.removeprefix(f"{prefix}.{i}.")]
                                                         .weight.detach().double()).cpu() for r in brows})
        else:
            x_out = cache.acts(i + 1, shape, dtype, create=True, stream="spectra")
            spectra.update(_block_spectra(block, f"{prefix}.{i}.", brows, recipe, x_in, x_out, kwargs, device,
                                          extra))
            if i > 0:
                cache.acts_path(i, "spectra").unlink(missing_ok=True)
            x_in = x_out
        block.to("cpu")
    cache.acts_path(len(blocks), "spectra").unlink(missing_ok=True)
    cache.save_tensors("spectra", spectra)
    return spectra


def apply_global_allocation(plan, recipe, spectra) -> None:
    for si, stage in enumerate(recipe.stages):
        if stage.allocator != "uniform":
            allocate_global(stage, [r for r in plan if r.stage == si], spectra)
