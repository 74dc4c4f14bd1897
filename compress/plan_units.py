"""Plan rows of methods that act on groups of a block's modules (``Method.unit == "block"``, e.g. MoDeGPT).

A ``UnitRow`` is one unit of one block: ``mlp`` (gate, up, down), ``qk`` (q, k: every KV group of the layer) or
``vo`` (v, o). Its budget knob is the number of kept dims of the shrunk dimension (intermediate neurons, or head dims
of q/k or of v/o), and its cost model (``structured``) is linear in it: ``per_dim · kept + fixed`` parameters, so a
kept fraction f of the dims keeps a fraction f of the unit's parameters up to rounding. Allocators only ever ask the
row's cost model (``params``, ``knob_for``), never r(m+n).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from torch import nn

from .allocation.cost import CostModel, cost_of, register_cost_model
from .errors import LrcError
from .roles import block_roles


@dataclass
class UnitRow:
    name: str  # the unit: the MLP module's name, or "<attention module>:qk" / ":vo"
    stage: int
    method: str
    block: int
    kind: str  # mlp | qk | vo
    members: dict[str, str]  # role -> full module name
    dim: int  # dense size of the shrunk dimension (intermediate size or head dim)
    multiple: int  # kept dims come in multiples of this (2 for q/k: RoPE pairs)
    per_dim: int  # parameters per kept dim (weights and the biases that shrink with it)
    fixed: int  # parameters that do not shrink (the o bias)
    params_dense: int  # parameters of the member modules now (weights + biases)
    knob: int | None = None  # kept dims (None: decided from data)
    note: str = ""
    kept_fraction_target: float | None = None  # the allocator's share for this unit (1 − φ_l for MoDeGPT)
    remark: str = ""  # what the plan left out of this block (e.g. q/k kept whole on Qwen3), kept in every note
    align: int = 1
    cost_model: str = "structured"
    compensation: bool = field(default=False, repr=False)
    standalone: bool = field(default=True, repr=False)

    rank = None  # no rank: the knob is ``knob``
    out_features = in_features = None

    @property
    def factorize(self) -> bool | None:
        return None if self.knob is None else self.knob < self.dim

    @property
    def params_before(self) -> int:
        return self.params_dense

    @property
    def params_after(self) -> int | None:
        return None if self.knob is None else STRUCTURED.params(self, self.knob)

    def describe(self) -> str:
        what = {"mlp": "intermediate", "qk": "q/k head dim", "vo": "v/o head dim"}[self.kind]
        return f"{what} {self.knob if self.knob is not None else '?'}/{self.dim}"

    def to_dict(self) -> dict:
        return {**asdict(self), "params_before": self.params_before, "params_after": self.params_after}


class StructuredCost(CostModel):
    """``per_dim · kept + fixed`` parameters; all dims kept = the unit as it is. The knob is a number of kept dims, a
    multiple of ``row.multiple`` (RoPE pairs for q/k) in [multiple, dim]."""

    name = "structured"

    def params(self, row, knob: int) -> int:
        return row.params_dense if knob >= row.dim else row.per_dim * knob + row.fixed

    def knob_for(self, row, kept_fraction: float) -> int:
        from .structured import kept_dims

        return kept_dims(row.dim, kept_fraction, row.multiple)

    def align(self, row, knob: int, up: bool = False) -> int:
        m = row.multiple
        knob = -(-knob // m) * m if up else knob // m * m
        return min(max(knob, m), row.dim)

    def max_saving(self, row) -> int:
        return row.dim - row.multiple

    def describe(self, row) -> str:
        return row.describe()


STRUCTURED = register_cost_model(StructuredCost())


def _params(mod: nn.Linear) -> int:
    return mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)


def _has_bias(mod: nn.Linear) -> bool:
    return mod.bias is not None


def block_unit_rows(block: nn.Module, config, bi: int, prefix: str, si: int, method: str, kinds: list[str],
                    targets: list[re.Pattern] | None, ignore: list[re.Pattern]) -> tuple[list[UnitRow], list[str]]:
    """The units of ``kinds`` in block ``bi`` whose member modules the stage's targets/ignore select, and notes on
    what was skipped (a unit is all or nothing: a partly targeted unit is left out with a note)."""
    where = f"{prefix}.{bi}"
    att, mlp = block_roles(block, config, set(kinds), where)
    mods = dict(block.named_modules())
    full = lambda rel: f"{where}.{rel}"  # noqa: E731
    rows, notes = [], []

    def wanted(members: dict[str, str]) -> bool:
        names = [full(m) for m in members.values()]
        hit = [(targets is None or any(t.search(n) for t in targets)) and not any(t.search(n) for t in ignore)
               for n in names]
        if any(hit) and not all(hit):
            notes.append(f"{where}: unit {sorted(members)} only partly targeted; left out")
        return all(hit)

    if mlp is not None and "mlp" in kinds and wanted(mlp.members):
        g, u, d = (mods[mlp.gate], mods[mlp.up], mods[mlp.down])
        per = 3 * mlp.hidden + _has_bias(g) + _has_bias(u)
        rows.append(UnitRow(full(mlp.path), si, method, bi, "mlp", {k: full(v) for k, v in mlp.members.items()},
                            mlp.intermediate, 1, per, mlp.hidden if _has_bias(d) else 0,
                            _params(g) + _params(u) + _params(d)))
    if att is not None:
        q, k, v, o = (mods[att.q], mods[att.k], mods[att.v], mods[att.o])
        H, Hkv, h = att.num_heads, att.num_kv_heads, att.hidden
        if "qk" in kinds:
            members = {"q": att.q, "k": att.k}
            if att.qk_norm:
                notes.append(f"{where}: q/k kept whole (type II skipped): per-head q/k norms (q_norm/k_norm) before "
                             "RoPE make a selection of head dims inexact")
            elif not att.rope_ok:
                notes.append(f"{where}: q/k kept whole (type II skipped): partial rotary embedding")
            elif wanted(members):
                per = (H + Hkv) * h + H * _has_bias(q) + Hkv * _has_bias(k)
                rows.append(UnitRow(f"{full(att.path)}:qk", si, method, bi, "qk",
                                    {r: full(n) for r, n in members.items()}, att.head_dim, 2, per, 0,
                                    _params(q) + _params(k)))
        if "vo" in kinds and wanted({"v": att.v, "o": att.o}):
            per = (H + Hkv) * h
            fixed = h if (_has_bias(v) or _has_bias(o)) else 0  # the v bias folds into the o bias
            rows.append(UnitRow(f"{full(att.path)}:vo", si, method, bi, "vo",
                                {"v": full(att.v), "o": full(att.o)}, att.head_dim, 1, per, fixed,
                                _params(v) + _params(o)))
    return rows, notes


def unit_rows(model: nn.Module, recipe, si: int, owner: dict[str, int]) -> tuple[list[UnitRow], list[str]]:
    """Every unit stage ``si`` targets, over all blocks; ``owner`` maps module names to the stage that claimed
    them (shared with the Linear stages: a module belongs to one stage only)."""
    from .methods import METHODS
    from .plan import find_blocks

    stage = recipe.stages[si]
    method = METHODS[stage.method](recipe.method_config(si))
    try:
        targets = [re.compile(t) for t in stage.targets] if stage.targets else None
        ignore = [re.compile(t) for t in stage.ignore]
    except re.error as err:
        raise LrcError(f"stages[{si}].targets/ignore: bad regex ({err})") from None
    prefix, blocks = find_blocks(model)
    rows, notes = [], []
    for bi, block in enumerate(blocks):
        r, n = block_unit_rows(block, model.config, bi, prefix, si, stage.method, method.unit_kinds(),
                               targets, ignore)
        for row in r:
            row.remark = "; ".join(x.removeprefix(f"{prefix}.{bi}: ") for x in n)
        rows += r
        notes += n
    for row in rows:
        for name in row.members.values():
            if name in owner:  # the Linear stages were planned first, a later one may have claimed it
                first, then = sorted((si, owner[name]))
                raise LrcError(f"stages[{then}]: {name} is already compressed by stages[{first}]")
            owner[name] = si
    if not rows:
        raise LrcError(f"stages[{si}]: {stage.method} found no unit to compress"
                       + (f" ({notes[0]})" if notes else ""))
    return rows, notes


def check_stage(stage, si: int, recipe) -> None:
    """What a block-unit stage accepts beyond the recipe's checks (which refuse allocators that cannot allocate its
    units): a ``param_ratio`` budget and the layer objective (its closed forms fit each unit on its own inputs)."""
    if stage.param_ratio is None:
        raise LrcError(f"stages[{si}]: {stage.method} takes a param_ratio budget (the kept fraction of its units' "
                       "parameters); rank and energy budgets are for low-rank methods")
    if recipe.engine.objective != "layer":
        raise LrcError(f"engine.objective: {stage.method} supports the layer objective only")


def allocate_units(stage, rows: list[UnitRow], kept_by_block: dict[int, float] | None = None) -> None:
    """Set every unit's knob from its kept fraction: ``param_ratio`` for all (uniform), or the block's own share
    (``kept_by_block``, from block_influence). Knobs go through the row's cost model."""
    for r in rows:
        f = stage.param_ratio if kept_by_block is None else kept_by_block[r.block]
        r.kept_fraction_target = round(float(f), 6)
        r.knob = cost_of(r).knob_for(r, f)
        r.note = f"kept share {f:.4f}" + ("" if kept_by_block is None else " (block influence)") + \
            (f"; {r.remark}" if r.remark else "")


def unit_report(row: UnitRow, rel_error: float | None, seconds: float, note: str, kept_dim: int | None = None,
                dropped_score_share: float | None = None) -> dict:
    """The report row of a unit (``type: structured``); ``kept_dim`` defaults to the row's knob.

    ``rel_error`` means what it means in every row, ``‖ΔY‖ / ‖Y‖`` of the unit's output on the calibration inputs
    (MLP output, the v→o map's output; 0 for a unit kept whole), or None where it is not measured: a ``qk`` unit's
    output is the attention logits over pairs of tokens, which its statistics (diagonals of C_Q, C_K) do not give.
    A ``qk`` row has ``dropped_score_share`` instead: the share of the CR bound's pair scores its dropped dims carry
    (``Σ dropped / Σ all``, over the KV groups)."""
    kept = row.knob if kept_dim is None else kept_dim
    out = {"name": row.name, "stage": row.stage, "method": row.method, "type": "structured", "unit": row.kind,
           "block": row.block, "out_features": None, "in_features": None, "rank": None, "dense_dim": row.dim,
           "kept_dim": kept, "kept_fraction_target": row.kept_fraction_target, "params_before": row.params_before,
           "params_after": row.params_after if kept < row.dim else row.params_before, "rel_error": rel_error}
    if row.kind == "qk":
        out["dropped_score_share"] = dropped_score_share if dropped_score_share is not None else \
            (0.0 if kept >= row.dim else None)
    return {**out, "seconds": round(seconds, 4), "note": (f"{row.note}; " if row.note else "") + note}
