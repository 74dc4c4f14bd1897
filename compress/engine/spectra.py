"""Statistics that must exist before the block loop: gradient statistics (FWSVD's Fisher sums, KFAC-SVD's output
gradient Gram) and the spectra global allocators read.

``allocation_spectra`` runs the dense model block by block over the cached calibration inputs (original
propagation: every block sees the dense model's activations, as the budget is decided before anything changes),
collects each stage's statistics, and keeps only each targeted matrix's singular values — the allocator's input.
Both results are cached in the run directory so an interrupted run resumes without recomputing them.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from ..allocation import ALLOCATORS, SPECTRUM, allocate_global
from ..allocation.influence import cosine_influence, influence_key
from ..methods.eora.math import residual_spectrum
from ..methods import METHODS
from .cache import load_tensors, save_tensors
from .decompose import effective_weight
from .gradients import GRADIENT_STATS, gradient_stats_streamed
from .passes import run_pass
from .stats import MODEL_STATS, attach, block_groups
from .stream import Host
from .sweep import Sweep
from .anchors import Anchors, probe_factors, width_tag
from ..allocation.bits import Widths, quant_errors, spec_for
from ..allocation.search import SearchOptions


def gradient_needs(recipe) -> dict[int, set[str]]:
    """Stage index -> the gradient statistics (``engine/gradients.py``) its method, as configured, needs."""
    out = {}
    for i, s in enumerate(recipe.stages):
        need = set(METHODS[s.method](recipe.method_config(i)).needs) & set(GRADIENT_STATS)
        if need:
            out[i] = need
    return out


class BlockStats(Mapping):
    """Gradient statistics by full module name (``{name: {key: tensor}}``, as ``Method.spectrum`` reads them), read
    from the run cache one block at a time: memory holds one block's statistics, never the model's."""

    def __init__(self, cache, keys: list[str], block_of: dict[str, int]):
        self.cache, self.keys, self.block_of = cache, keys, block_of
        self._block, self._data = None, {}

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        j = self.block_of[name]
        if j != self._block:
            self._block, self._data = j, {}
            for key in self.keys:  # a later stream's statistics of the same module replace an earlier one's
                for k, v in (self.cache.load_tensors(f"{key}_{j}") or {}).items():
                    n, kind = k.rsplit(".", 1)
                    self._data.setdefault(n, {})[kind] = v
        return self._data.get(name, {})

    def __iter__(self):
        return iter(self.block_of)

    def __len__(self) -> int:
        return len(self.block_of)


def gradient_stats(run, host) -> BlockStats:
    """The gradient statistics the stages need, each from its stage's calibration stream, one block on the device at
    a time (``gradients.gradient_stats_streamed``; ``host``: ``stream.Host``), saved per block to the run cache as
    the backward pass leaves it (an interrupted run recomputes them unless the pass completed)."""
    recipe, cache, plan = run.recipe, run.cache, run.plan
    needs = gradient_needs(recipe)
    keys, block_of = [], {}
    for s in run.streams:
        mine = {i for i in needs if i in s.stages}
        if not mine:
            continue
        key = "grads" if s.name == "acts" else f"grads_{s.name}"
        keys.append(key)
        wants: dict[str, list[str]] = {}
        for r in plan:
            if r.stage in mine:
                block_of[r.name] = r.block
                for stat in sorted(needs[r.stage]):
                    if r.name not in wants.setdefault(stat, []):
                        wants[stat].append(r.name)
        if cache.load_tensors(f"{key}_done") is None:
            run.progress.phase("gradients (backward passes)")
            gradient_stats_streamed(run.model, run.prefix, run.blocks, s.ids, wants, host, cache,
                                    recipe.engine.batch_size, run.progress,
                                    on_block=lambda j, acc, key=key: cache.save_tensors(f"{key}_{j}", acc))
            cache.save_tensors(f"{key}_done", {"blocks": torch.tensor([len(run.blocks)])})
    return BlockStats(cache, keys, block_of)


@torch.no_grad()
def _influence(x_in, x_out, batch_size: int) -> torch.Tensor:
    """MoDeGPT's block importance ``s = 1 − mean_t cos(h_in, h_out)`` on the dense model (fp64 sums)."""
    total, tokens = 0.0, 0
    for s in range(0, x_in.shape[0], batch_size):
        c, t = cosine_influence(x_in[s:s + batch_size], x_out[s:s + batch_size])
        total, tokens = total + c, tokens + t
    return torch.tensor([1 - total / max(tokens, 1)], dtype=torch.float64)


@torch.no_grad()
def _block_spectra(block, index, prefix, rows, recipe, x_in, x_out, kwargs, device, extra, sweep=None,
                   reference=None, anchors=None) -> dict[str, torch.Tensor]:
    """Spectra (or, for ``sensitivity`` stages, the perplexity sweep; for ``search``, the spectra and each matrix's
    measured KL anchor, ``anchor:<name>``) of the block's rows on dense inputs."""
    units = [r for r in rows if not r.linear]  # a block method's units offered to the search
    rows = [r for r in rows if r.linear]
    rel = {r.name.removeprefix(prefix) for r in rows}
    if not rel:  # only the block's outputs are needed (the next block's inputs, block influence)
        run_pass(block, x_in, kwargs, recipe.engine.batch_size, device, out=x_out)
        return anchors.units(index, block, x_in, units) if units else {}
    modules = dict(block.named_modules())
    groups = block_groups(block, x_in, kwargs, device, rel)
    owner = {n: g[0] for g in groups for n in g if n in rel}
    methods = {si: METHODS[s.method](recipe.method_config(si)) for si, s in enumerate(recipe.stages)}
    needs = set().union(*(set(methods[r.stage].needs) for r in rows
                          if SPECTRUM[recipe.stages[r.stage].allocator] != "weights")) - MODEL_STATS
    collectors = attach(needs, modules, owner) if needs else []
    try:
        run_pass(block, x_in, kwargs, recipe.engine.batch_size, device, out=x_out)
    finally:
        for c in collectors:
            c.remove()
    out, pending, anchored = {}, [], []
    source = dict(reference.named_modules()) if reference is not None else modules
    for r in rows:
        n = r.name.removeprefix(prefix)
        # no token reached it (an expert never routed to): the plain spectrum of its weights (or residual) stands
        # in; the block loop reports it and leaves it as is
        starved = bool(collectors) and not collectors[0].tokens(n)
        if r.compensation:  # the whitened residual of the model as it is now against the reference weights
            delta = effective_weight(source[n]).to(device) - effective_weight(modules[n])
            gram = next(c for c in collectors if c.name == "input_gram")
            out[r.key] = torch.linalg.svdvals(delta).cpu() if starved else \
                residual_spectrum(delta, gram.result(n), methods[r.stage].config.rtol).cpu()
            continue
        W = modules[n].weight.detach().double()
        kind = SPECTRUM[recipe.stages[r.stage].allocator]
        if kind == "weights" or starved:
            out[r.key] = torch.linalg.svdvals(W).cpu()
            continue
        stats = {c.name: c.result(n) for c in collectors}
        stats.update(extra.get(r.name, {}))
        spectrum = methods[r.stage].spectrum(W, stats)
        if kind in ("method", "anchors"):
            out[r.key] = spectrum.sigma.cpu()
        if kind == "anchors":
            anchored.append((modules[n], spectrum, r))
            if anchors.widths:  # a byte budget: RTN's error at each width, of the matrix and of its factors
                out[f"qerr:{r.key}"] = quant_errors(W, stats.get("input_gram"), probe_factors(r, spectrum),
                                                    anchors.widths)
        elif kind == "sweep":
            pending.append((modules[n], spectrum, r))
    if pending:  # every candidate of the block through the blocks after it together
        out.update(sweep(index, block, x_in, pending))
    if anchored:
        out.update({f"anchor:{k}": v for k, v in anchors(index, block, x_in, anchored).items()})
    if units:
        out.update(anchors.units(index, block, x_in, units))
    return out


def allocation_spectra(run) -> dict[str, torch.Tensor]:
    """What the global allocators read, per matrix (cached as ``spectra.safetensors`` in the run): singular values,
    or for ``sensitivity`` the calibration perplexity at each candidate ratio (also kept under
    ``$LRC_CACHE/sensitivity``, keyed by model, calibration tokens and method, as it is the expensive one).
    ``run``: ``job.Run``; the dense model's blocks are walked over the main stream's block-0 inputs."""
    model, blocks, prefix, plan, recipe, cache = run.model, run.blocks, run.prefix, run.plan, run.recipe, run.cache
    x0, shape, dtype, kwargs, device, progress = run.main.x_in, run.shape, run.dtype, run.main.dev_kwargs, \
        run.device, run.progress
    extra, ids, ref_blocks, lazy = run.extra, run.main.ids, run.ref_blocks, run.lazy
    cached = cache.load_tensors("spectra")
    if cached is not None:
        return cached
    rows = [r for r in plan if SPECTRUM.get(recipe.stages[r.stage].allocator) not in (None, "influence")
            and (r.linear or SPECTRUM[recipe.stages[r.stage].allocator] == "anchors")]  # what allocators read
    influence = any(SPECTRUM.get(s.allocator) == "influence" for s in recipe.stages)
    if not rows and not influence:
        return {}
    sweep_key = _sweep_key(model, ids, recipe, lazy) if any(SPECTRUM[recipe.stages[r.stage].allocator] == "sweep"
                                                             for r in rows) else None
    sweep = Sweep(model, prefix, blocks, Host(blocks, device, lazy), ids, kwargs, recipe, progress,
                  _load_sweep(sweep_key) if sweep_key else None) if sweep_key else None
    anchor_key = _sweep_key(model, ids, recipe, lazy, "search", ANCHOR_FIELDS) if any(
        SPECTRUM[recipe.stages[r.stage].allocator] == "anchors" for r in rows) else None
    anchors = _anchors(run, _load_sweep(anchor_key, "search-anchors"),
                       [r.key for r in rows if SPECTRUM[recipe.stages[r.stage].allocator] == "anchors"]) \
        if anchor_key else None
    spectra: dict[str, torch.Tensor] = {}
    data_free = not influence and all(SPECTRUM[recipe.stages[r.stage].allocator] == "weights" for r in rows)
    x_in = x0
    with sweep if sweep is not None else contextlib.nullcontext(), \
            anchors if anchors is not None else contextlib.nullcontext():
        for i, block in enumerate(blocks):
            brows = [r for r in rows if r.block == i]
            progress.phase(f"spectra for allocation, block {i + 1}/{len(blocks)}")
            block = lazy.load(i, device) if lazy is not None else block.to(device)
            if data_free:
                modules = dict(block.named_modules())
                spectra.update({r.key: torch.linalg.svdvals(modules[r.name.removeprefix(f"{prefix}.{i}.")]
                                                            .weight.detach().double()).cpu() for r in brows})
            else:
                x_out = cache.acts(i + 1, shape, dtype, create=True, stream="spectra")
                ref = ref_blocks[i].to(device) if ref_blocks is not None else None
                spectra.update(_block_spectra(block, i, f"{prefix}.{i}.", brows, recipe, x_in, x_out, kwargs[i],
                                              device, extra, sweep, ref, anchors))
                if influence:
                    spectra[influence_key(i)] = _influence(x_in, x_out, recipe.engine.batch_size)
                if ref is not None:
                    ref_blocks[i].to("cpu")
                if i > 0:
                    cache.acts_path(i, "spectra").unlink(missing_ok=True)
                x_in = x_out
            lazy.unload(i) if lazy is not None else block.to("cpu")
    if sweep_key is not None:
        _store_sweep(sweep_key, {r.key: spectra[r.key] for r in rows
                                 if SPECTRUM[recipe.stages[r.stage].allocator] == "sweep"})
    if anchor_key is not None:
        _store_sweep(anchor_key, {k: v for k, v in spectra.items() if k.startswith(("anchor:", "curve:", "qcurve:"))},
                     "search-anchors")
    cache.acts_path(len(blocks), "spectra").unlink(missing_ok=True)
    cache.save_tensors("spectra", spectra)
    return spectra


# the search options its anchors depend on (not the budget, the trials or the grid: a rerun at another ratio reuses
# them)
ANCHOR_FIELDS = ("samples", "temperature", "min_position", "anchor_fraction")


def _sweep_key(model, ids, recipe, lazy=None, allocator: str = "sensitivity", fields=None) -> str:
    """Key of an expensive per-matrix measurement kept across runs: the model, the calibration tokens and each
    ``allocator`` stage's method, options, targets and the allocator options in ``fields`` (all by default)."""
    import hashlib

    from .cache import model_fingerprint

    h = hashlib.sha256(model_fingerprint(model, lazy.state_items() if lazy is not None else None).encode())
    h.update(ids.numpy().tobytes())
    for si, st in enumerate(recipe.stages):
        if st.allocator == allocator:
            opts = st.allocator_options if fields is None else \
                {k: v for k, v in ALLOCATORS[allocator].check_options(st.allocator_options).model_dump().items()
                 if k in fields}
            h.update(f"{si}{st.method}{recipe.method_config(si).model_dump()}{opts}{st.align}"
                     f"{st.targets}{st.ignore}".encode())
    return h.hexdigest()[:24]


def _sweep_path(key: str, kind: str = "sensitivity"):
    from ..models import cache_root

    return cache_root() / kind / f"{key}.safetensors"


def _load_sweep(key: str, kind: str = "sensitivity"):
    return load_tensors(_sweep_path(key, kind))


def _store_sweep(key: str, table: dict, kind: str = "sensitivity") -> None:
    save_tensors(_sweep_path(key, kind), table)


def _anchors(run, stored: dict | None = None, names: list[str] = ()) -> Anchors:
    """The ``search`` stages' measurements (``anchors.py``), on the main stream's first calibration windows;
    ``stored``: anchors measured by an earlier run (``anchor:<name>``), not measured again."""
    recipe = run.recipe
    si = next(i for i, s in enumerate(recipe.stages) if SPECTRUM[s.allocator] == "anchors")
    opts = SearchOptions.model_validate(recipe.stages[si].allocator_options)
    methods = {i: METHODS[s.method](recipe.method_config(i)) for i, s in enumerate(recipe.stages)
               if SPECTRUM.get(s.allocator) == "anchors"}
    return Anchors(run.model, run.prefix, run.blocks, Host(run.blocks, run.device, run.lazy), run.main.ids,
                   run.main.x_in, run.main.dev_kwargs, opts, run.cache, run.progress, stored, names, methods,
                   recipe.engine.batch_size, byte_widths(recipe))


def byte_widths(recipe) -> dict:
    """``{bits: QuantSpec}`` of a byte budget's narrower widths (``quantize.bits_options`` below 16); {} without
    one."""
    q = recipe.quantize
    if q is None or not q.bits_options:
        return {}
    return {b: spec_for(q, b) for b in q.bits_options if b < 16}


class SearchTable:
    """What the ``search`` allocator reads (``allocation/search.py``), by row key: each Linear's spectrum, each
    unit's measured error curve, each row's measured anchor, the number of blocks, and ``evaluate`` (whole-model KL
    of allocations, ``anchors.Anchors.evaluate``)."""

    def __init__(self, rows, spectra, n_blocks: int, anchors: Anchors | None, quant=None):
        self.sigma = {r.key: spectra[r.key] for r in rows if r.linear}
        self.curve = {r.key: spectra[f"curve:{r.key}"] for r in rows if not r.linear}
        self.anchor = {r.key: float(spectra[f"anchor:{r.key}"]) for r in rows}
        self.widths = None  # a byte budget's widths and quantization errors (``allocation/bits.py``)
        if quant is not None and quant.bits_options:
            tag = width_tag(quant)
            self.widths = Widths(sorted(quant.bits_options), quant,
                                 {r.key: spectra[f"qerr:{r.key}"] for r in rows if r.linear},
                                 {r.key: spectra[f"qcurve:{tag}:{r.key}"] for r in rows if not r.linear})
        self.n_blocks, self._anchors, self.result, self.dropped = n_blocks, anchors, None, set()
        self._rows = {r.key: r for r in rows}
        self.evaluate = self._evaluate if anchors is not None else None

    def _evaluate(self, allocations):
        with self._anchors:
            return self._anchors.evaluate(allocations, self._rows)


def apply_global_allocation(plan, recipe, spectra, run=None) -> dict:
    """Every non-uniform stage's allocation; returns ``{stage index: the allocator's record}`` for allocators that
    keep one (``search``: its trials and every row's candidates), for the report. A group of stages (alternatives
    for the same modules) is allocated once, on its first stage, over all their rows; the rows the search did not
    choose leave ``plan`` (in place), so each module is left with the one row that acts on it."""
    records = {}
    done = set()
    for si, stage in enumerate(recipe.stages):
        if stage.allocator == "uniform" or si in done:
            continue
        group = recipe.siblings(si)
        done.update(group)
        rows = [r for r in plan if r.stage in group]
        if SPECTRUM[stage.allocator] == "anchors":
            table = SearchTable(rows, spectra, len(run.blocks) if run is not None else
                                1 + max(r.block for r in rows), _anchors(run) if run is not None else None,
                                recipe.quantize if stage.byte_ratio is not None else None)
            allocate_global(stage, rows, table)
            records[si] = table.result
            if table.dropped:
                plan[:] = [r for r in plan if not (r.stage in group and r.key in table.dropped)]
        else:
            allocate_global(stage, rows, spectra)
    return records
