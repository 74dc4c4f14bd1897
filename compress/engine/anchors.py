"""LEMS's measurements for the ``search`` allocator (methods.md §12), streamed block by block like ASVD's sweep.

- **Anchors.** For every matrix l, ``KL_l``: the mean per-token KL(p_dense ‖ p_l) over the search sequences, with only
  l replaced by its rank-``r0`` factors (``search.anchor_rank``), both logits at ``temperature``, positions from
  ``min_position`` on. Blocks before l's see dense inputs either way, so each candidate starts from the dense hidden
  states entering its block (the allocation pre-pass has them) and runs that block, the blocks after it (each loaded
  once for all the block's candidates) and the model's own head (``stream.replayed``, only the kept positions).
- **Trials.** ``evaluate(allocations)``: the whole model with every matrix at an allocation's rank, all allocations
  side by side through each block once, measured the same way. Each matrix's factors at its largest candidate rank
  are kept per block in the run cache during the pre-pass (``search_factors_<i>``); a rank is a slice of them (a
  truncation of the one SVD every rank of the method shares), and measured KLs are cached by allocation.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json

import torch
from torch import nn

from ..allocation.bits import FACTOR_PROBE, fake_quant
from ..allocation.cost import cost_of
from ..allocation.search import SearchOptions, anchor_rank, equal_rank, unit_knobs
from .capture import move_outside_blocks
from .passes import run_pass
from .stats import COLLECTORS
from .stream import hidden, replayed

STATE_BUDGET_BYTES = 1 << 30  # candidates' hidden states kept on the device at once


@contextlib.contextmanager
def _rounded(block, names: list[str], spec):
    """Every ``nn.Linear`` at or under ``names`` (relative to ``block``) with its weight rounded to ``spec`` (RTN,
    dequantized) for the duration; the weights are restored after."""
    saved = []
    try:
        for name in names if spec is not None else ():
            for mod in block.get_submodule(name).modules():
                if isinstance(mod, nn.Linear):
                    saved.append((mod, mod.weight.data.clone()))
                    mod.weight.data.copy_(fake_quant(mod.weight.data, spec))
        yield block
    finally:
        for mod, w in saved:
            mod.weight.data.copy_(w)


def width_tag(spec) -> str:
    """A byte budget's quantizer settings other than the width (``qcurve:<tag>:<key>`` entries of the stored
    anchors: measured once per setting, each width a row); ``spec``: a ``QuantSpec`` or the ``quantize`` section."""
    return f"g{spec.group_size or 0}{'s' if spec.symmetric else 'a'}-{spec.scale_dtype}"


def probe_factors(row, spectrum):
    """The factors ``(A, B)`` at ``FACTOR_PROBE·r_eq`` (aligned) whose quantization error stands for every rank's
    (``allocation/bits.py``)."""
    r = cost_of(row).align(row, max(int(FACTOR_PROBE * equal_rank(row)), row.align))
    return spectrum.factors(max(1, min(r, int(spectrum.sigma.numel()))))


def split(value) -> tuple[int | None, int | None]:
    """An allocation's value as ``(knob, bits)``: a knob (or None: dense), or ``[knob, bits]`` under a byte
    budget."""
    return (value[0], value[1]) if isinstance(value, (list, tuple)) else (value, None)


def options_of(recipe, row) -> SearchOptions:
    return SearchOptions.model_validate(recipe.stages[row.stage].allocator_options)


@torch.no_grad()
def _logprobs(model, prefix, as_tuple, h, ids, keep: int, temperature: float) -> torch.Tensor:
    """Log-probabilities at ``temperature`` of the last ``keep`` positions when the last block outputs ``h``."""
    with replayed(model, prefix, as_tuple) as replay:
        replay.h = h
        logits = model(input_ids=ids.to(h.device), use_cache=False, logits_to_keep=keep).logits
    return torch.log_softmax(logits.float() / temperature, dim=-1)


class Anchors:
    """``anchors(i, block, x_in, pending)`` → ``{row name: KL at its anchor rank}`` for the ``(module, spectrum, row)``
    items of block ``i`` (on the device, dense weights; ``x_in`` its dense inputs). ``evaluate(allocations)`` → the
    whole-model KL of each allocation. One instance per run; ``samples``, ``temperature`` and ``min_position`` come
    from the first search stage's options (one search set per run)."""

    def __init__(self, model, prefix, blocks, host, ids, x0, kwargs, opts: SearchOptions, cache, progress,
                 stored: dict | None = None, names: list[str] = (), methods: dict | None = None,
                 batch_size: int = 8, widths: dict | None = None):
        self.model, self.prefix, self.blocks, self.host, self.kwargs = model, prefix, blocks, host, kwargs
        self.widths = widths or {}  # a byte budget's narrower widths: bits → QuantSpec
        self.cache, self.progress, self.opts, self.batch_size = cache, progress, opts, batch_size
        self.methods = methods or {}  # stage index → configured method (the block methods' rebuild hooks)
        self.raw = dict(stored or {})  # ``anchor:<key>`` and, for units, ``curve:<key>``
        self.stored = {k.removeprefix("anchor:"): v for k, v in self.raw.items() if k.startswith("anchor:")}
        self.measures = any(n not in self.stored for n in names)  # some anchor is measured during the walk
        self.ids = ids[:opts.samples]
        self.x0 = x0[:opts.samples]
        seq = self.ids.shape[1]
        start = seq // 2 if opts.min_position is None else min(opts.min_position, seq - 1)
        self.keep = seq - start
        self.as_tuple = None
        self.dense_h = None  # the dense model's last hidden states on the search sequences

    def __enter__(self):
        move_outside_blocks(self.model, self.blocks, self.host.device)
        if self.measures:
            self._dense()  # now, before the walk holds a block on the device
        return self

    def __exit__(self, *exc):
        move_outside_blocks(self.model, self.blocks, "cpu")

    # the dense reference ---------------------------------------------------------------------------------------
    def _dense(self) -> torch.Tensor:
        if self.dense_h is None:
            self.progress.phase("search: the dense model's outputs on the search sequences")
            self.dense_h = self._through([self.x0.to(self.host.device)], 0)[0]
        return self.dense_h

    def _through(self, states: list, start: int) -> list:
        """``states`` through blocks ``start``… (each loaded once for all of them)."""
        for j in range(start, len(self.blocks)):
            block = self.host.load(j)
            out = []
            for s in states:
                y, self.as_tuple = hidden(block(s, **self.kwargs[j]))
                out.append(y)
            states = out
            self.host.unload(j)
        return states

    def _kls(self, states: list) -> list[float]:
        """Mean per-token KL(dense ‖ state) of each final hidden state, one sequence at a time (the dense
        log-probabilities computed once per sequence for all states)."""
        dense = self._dense()
        totals = [0.0] * len(states)
        for k in range(self.ids.shape[0]):
            ref = _logprobs(self.model, self.prefix, bool(self.as_tuple), dense[k:k + 1], self.ids[k:k + 1],
                            self.keep, self.opts.temperature)
            p = ref.exp()
            for t, s in enumerate(states):
                lp = _logprobs(self.model, self.prefix, bool(self.as_tuple), s[k:k + 1], self.ids[k:k + 1],
                               self.keep, self.opts.temperature)
                totals[t] += float((p * (ref - lp)).sum(-1).double().sum())
        tokens = self.ids.shape[0] * self.keep
        return [t / tokens for t in totals]

    # anchors ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, i: int, block, x_in: torch.Tensor, pending: list) -> dict[str, torch.Tensor]:
        out = {row.key: self.stored[row.key] for _, _, row in pending if row.key in self.stored}
        todo = [item for item in pending if item[2].key not in out]
        h = x_in[:self.opts.samples].to(self.host.device)
        factors = {}
        per = max(1, STATE_BUDGET_BYTES // (h.numel() * h.element_size()))
        for c in range(0, len(todo), per):
            chunk = todo[c:c + per]
            self.progress.phase(f"search anchors, block {i + 1}: matrices {c + 1}-{c + len(chunk)}/{len(todo)}")
            states = []
            for module, spectrum, row in chunk:  # this block, once per matrix at its anchor rank
                r0 = min(anchor_rank(row, self.opts.anchor_fraction), int(spectrum.sigma.numel()))
                original = module.weight.data.clone()
                try:
                    A, B = spectrum.factors(r0)
                    module.weight.data.copy_((A @ B).to(original.dtype))
                    y, self.as_tuple = hidden(block(h, **self.kwargs[i]))
                finally:
                    module.weight.data.copy_(original)
                states.append(y)
            states = self._through(states, i + 1)
            for (_, _, row), kl in zip(chunk, self._kls(states)):
                out[row.key] = torch.tensor([kl], dtype=torch.float64)
        for module, spectrum, row in pending:  # the factors every trial slices
            top = min(max(cost_of(row).max_saving(row), 1), int(spectrum.sigma.numel()))
            A, B = spectrum.factors(top)
            factors[f"{row.key}.A"], factors[f"{row.key}.B"] = A.float().cpu().contiguous(), \
                B.float().cpu().contiguous()
        self.cache.save_tensors(f"search_factors_{i}", factors)
        return out

    # units of block methods --------------------------------------------------------------------------------------
    def _unit_stats(self, i: int, block, x_in, rows: list) -> dict:
        """The statistics the units' methods declare (collector → full module name → tensor), from one pass of the
        dense block over all of its calibration inputs (what the engine would collect without ``sequential``)."""
        prefix = f"{self.prefix}.{i}."
        needs: dict[str, set[str]] = {}
        for r in rows:
            for coll, members in self.methods[r.stage].statistics(r).items():
                needs.setdefault(coll, set()).update(n.removeprefix(prefix) for _, n in members)
        modules = dict(block.named_modules())
        collectors = [COLLECTORS[c](modules, {n: n for n in names}) for c, names in sorted(needs.items())]
        try:
            run_pass(block, x_in, self.kwargs[i], self.batch_size, self.host.device)
        finally:
            for c in collectors:
                c.remove()
        return {c.name: {prefix + k: v for k, v in c.acc.items()} for c in collectors}

    def _rebuilt(self, i: int, block, units: list, stats: dict):
        """A copy of ``block`` with each ``(row, knob)`` of ``units`` rebuilt by its method at that knob."""
        b = copy.deepcopy(block)
        prefix = f"{self.prefix}.{i}."
        by_stage: dict[int, list] = {}
        for row, knob in units:
            by_stage.setdefault(row.stage, []).append(dataclasses.replace(row, knob=int(knob)))
        for si, rows in by_stage.items():
            method = self.methods[si]
            roles = method.roles(b, self.model.config, rows, prefix)
            for _, _, phase_rows in method.phases(rows, roles):
                method.rebuild(b, roles, phase_rows, stats)
        return b

    @torch.no_grad()
    def units(self, i: int, block, x_in: torch.Tensor, rows: list) -> dict[str, torch.Tensor]:
        """For each unit row (a block method's group of modules) of block ``i``: ``curve:<key>``, its block's output
        error ``‖Y′ − Y‖²/‖Y‖²`` on the search sequences at each of ``unit_knobs`` (rows ``(knob, error)``, the
        anchor knob first), and ``anchor:<key>``, the whole-model KL with only it rebuilt at the anchor knob. Under
        a byte budget also ``qcurve:<tag>:<key>``: the same error with the unit's Linears rounded (RTN) to each
        width, at each knob and dense (``knob = dim``). The statistics are kept per block in the run cache
        (``search_units_<i>``) for the trials."""
        stats = self._unit_stats(i, block, x_in, rows)
        self.cache.save_tensors(f"search_units_{i}", {f"{c}|{n}": v.cpu() for c, d in stats.items()
                                                        for n, v in d.items()})
        qkey = (lambda r: f"qcurve:{width_tag(next(iter(self.widths.values())))}:{r.key}") if self.widths else None
        out = {k: self.raw[k] for r in rows for k in (f"anchor:{r.key}", f"curve:{r.key}") if k in self.raw}
        if qkey is not None:
            out.update({qkey(r): self.raw[qkey(r)] for r in rows if self._has_widths(self.raw.get(qkey(r)))})
        todo = [r for r in rows if f"anchor:{r.key}" not in out or f"curve:{r.key}" not in out]
        qtodo = [r for r in rows if qkey is not None and qkey(r) not in out]
        if not todo and not qtodo:
            return out
        h = x_in[:self.opts.samples].to(self.host.device)
        y0, self.as_tuple = hidden(block(h, **self.kwargs[i]))
        ref = y0.double().pow(2).sum()

        def err(b) -> float:
            y, _ = hidden(b(h, **self.kwargs[i]))
            return float((y.double() - y0.double()).pow(2).sum() / ref), y

        states, prefix = [], f"{self.prefix}.{i}."
        for n, r in enumerate([*todo, *(r for r in qtodo if r not in todo)]):
            knobs = unit_knobs(r, self.opts.anchor_fraction)
            curve, widths = r in todo, r in qtodo
            self.progress.phase(f"search anchors, block {i + 1}: unit {n + 1}/{len(todo) + len(qtodo)} "
                                f"({r.name.removeprefix(prefix)}, {len(knobs)} knobs)")
            pts, qpts = [], []
            for knob in [*knobs, *([r.dim] if widths else [])]:
                b = block if knob == r.dim else self._rebuilt(i, block, [(r, knob)], stats)
                if curve and knob != r.dim:
                    e, y = err(b)
                    pts.append((knob, e))
                    if len(pts) == 1:
                        states.append(y)
                for bits, spec in (self.widths.items() if widths else ()):
                    with _rounded(b, [m.removeprefix(prefix) for m in r.modules()], spec):
                        qpts.append((knob, bits, err(b)[0]))
            if curve:
                out[f"curve:{r.key}"] = torch.tensor(pts, dtype=torch.float64)
            if widths:
                out[qkey(r)] = torch.tensor(qpts, dtype=torch.float64)
        for r, kl in zip(todo, self._kls(self._through(states, i + 1))):
            out[f"anchor:{r.key}"] = torch.tensor([kl], dtype=torch.float64)
        return out

    def _has_widths(self, stored) -> bool:
        """Whether a stored ``qcurve`` has every width this run offers."""
        return stored is not None and set(self.widths) <= {int(b) for b in stored[:, 1].tolist()}

    # trials ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, allocations: list[dict[str, int | None]], rows: dict) -> list[float]:
        """Whole-model KL of each allocation (``{row key: knob or None for dense}``, or ``[knob, bits]`` under a byte
        budget; ``rows``: key → plan row), cached by allocation. A Linear's rank slices its cached factors; units are
        rebuilt at their knob from the block's cached statistics; a width rounds each stored matrix (RTN)."""
        key = hashlib.sha256(json.dumps(allocations, sort_keys=True).encode()).hexdigest()[:16]
        stored = self.cache.load_tensors(f"search_eval_{key}")
        if stored is not None:
            return [float(v) for v in stored["kl"]]
        states = [self.x0.to(self.host.device) for _ in allocations]
        for j in range(len(self.blocks)):
            self.progress.phase(f"search: {len(allocations)} allocation(s) through block {j + 1}/{len(self.blocks)}")
            block = self.host.load(j)
            mine = [k for k, r in rows.items() if r.block == j]
            factors = self.cache.load_tensors(f"search_factors_{j}") or {} \
                if any(getattr(rows[k], "linear", True) for k in mine) else {}
            stats = self._cached_stats(j) if any(not getattr(rows[k], "linear", True) for k in mine) else {}
            prefix = f"{self.prefix}.{j}."
            for t, alloc in enumerate(allocations):
                picks = {k: split(alloc.get(k)) for k in mine}
                units = [(rows[k], picks[k][0]) for k in mine
                         if not getattr(rows[k], "linear", True) and picks[k][0] is not None]
                b = self._rebuilt(j, block, units, stats) if units else block
                modules = dict(b.named_modules())
                with contextlib.ExitStack() as restore:  # every weight changed here is put back on exit
                    for k in mine:
                        rank, bits = picks[k]
                        spec = self.widths.get(bits)
                        if not getattr(rows[k], "linear", True):  # the unit's Linears at its width
                            restore.enter_context(_rounded(b, [m.removeprefix(prefix) for m in rows[k].modules()],
                                                           spec))
                            continue
                        if rank is None and spec is None:
                            continue
                        module = modules[rows[k].name.removeprefix(prefix)]
                        restore.callback(module.weight.data.copy_, module.weight.data.clone())
                        if rank is None:
                            module.weight.data.copy_(fake_quant(module.weight.data, spec))
                            continue
                        dev = module.weight.device
                        A, B = factors[f"{k}.A"][:, :rank].to(dev), factors[f"{k}.B"][:rank].to(dev)
                        if spec is not None:  # each factor rounded on its own, as they are stored
                            A, B = fake_quant(A, spec), fake_quant(B, spec)
                        module.weight.data.copy_((A @ B).to(module.weight.dtype))
                    states[t], self.as_tuple = hidden(b(states[t], **self.kwargs[j]))
            self.host.unload(j)
        kls = self._kls(states)
        self.cache.save_tensors(f"search_eval_{key}", {"kl": torch.tensor(kls, dtype=torch.float64)})
        return kls

    def _cached_stats(self, j: int) -> dict:
        """Block ``j``'s unit statistics as ``units`` kept them, on the device."""
        out: dict[str, dict] = {}
        for k, v in (self.cache.load_tensors(f"search_units_{j}") or {}).items():
            c, n = k.split("|", 1)
            out.setdefault(c, {})[n] = v.to(self.host.device)
        return out
