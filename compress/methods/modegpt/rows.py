"""MoDeGPT's plan rows and report rows (Lin et al., ICLR 2025, arXiv 2408.09632, Sec. 3: the three module types).

A ``UnitRow`` is one unit of one block: ``mlp`` (gate, up, down: type I), ``qk`` (q, k of every KV group of the
layer: type II) or ``vo`` (v, o: type III). Its budget knob is the number of kept dims of the shrunk dimension
(intermediate neurons, or head dims of q/k or of v/o), priced by the ``structured`` cost model (``cost.py``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from ...report_row import report_row
from ...roles import block_roles
from .cost import STRUCTURED


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
    alternative: bool = field(default=False, repr=False)  # one of a stage group's options (``plan.PlanRow``)
    bits: int | None = field(default=None, repr=False)  # a byte-budget search's bit width (``plan.PlanRow``)

    rank = None  # no rank: the knob is ``knob``
    out_features = in_features = None
    linear = False  # a group of modules (``plan.PlanRow.linear``)

    def modules(self) -> list[str]:
        """The full names of the modules this unit acts on."""
        return list(self.members.values())

    @property
    def key(self) -> str:
        """The row's name in the allocators' tables (``plan.PlanRow.key``)."""
        return f"{self.name}@{self.method}" if self.alternative else self.name

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
        d = {**asdict(self), "params_before": self.params_before, "params_after": self.params_after}
        if not self.alternative:
            del d["alternative"]
        if self.bits is None:
            del d["bits"]
        return d


def _params(mod: nn.Linear) -> int:
    return mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)


def _has_bias(mod: nn.Linear) -> bool:
    return mod.bias is not None


def parents(kinds) -> set[str]:
    """The parent modules (``roles.block_roles``' words) the units of ``kinds`` live in: q/k and v/o in the
    attention, mlp in the MLP."""
    return {"attention" if k in ("qk", "vo") else "mlp" for k in kinds}


def block_units(block: nn.Module, config, scope, kinds: list[str]) -> tuple[list[UnitRow], list[str]]:
    """The units of ``kinds`` in one block whose member modules ``scope`` (``plan_units.UnitScope``) selects, and
    notes on what was skipped (a unit is all or nothing: a partly targeted unit is left out with a note)."""
    where, full, bi, si, method = scope.where, scope.full, scope.index, scope.stage, scope.method
    att, mlp = block_roles(block, config, parents(kinds), where)
    mods = dict(block.named_modules())
    rows, notes = [], []

    def wanted(members: dict[str, str]) -> bool:
        return scope.pick(members, notes)

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


def unit_report(row: UnitRow, rel_error: float | None, seconds: float, note: str, kept_dim: int | None = None,
                dropped_score_share: float | None = None) -> dict:
    """The report row of a unit (``type: structured``); ``kept_dim`` defaults to the row's knob.

    ``rel_error`` means what it means in every row, ``‖ΔY‖ / ‖Y‖`` of the unit's output on the calibration inputs
    (MLP output, the v→o map's output; 0 for a unit kept whole), or None where it is not measured: a ``qk`` unit's
    output is the attention logits over pairs of tokens, which its statistics (diagonals of C_Q, C_K) do not give.
    A ``qk`` row has ``dropped_score_share`` instead: the share of the CR bound's pair scores its dropped dims carry
    (``Σ dropped / Σ all``, over the KV groups)."""
    kept = row.knob if kept_dim is None else kept_dim
    own = {}
    if row.kind == "qk":
        own["dropped_score_share"] = dropped_score_share if dropped_score_share is not None else \
            (0.0 if kept >= row.dim else None)
    return report_row(row, "structured", rel_error, seconds, note, unit=row.kind, block=row.block,
                      dense_dim=row.dim, kept_dim=kept, kept_fraction_target=row.kept_fraction_target,
                      params_after=row.params_after if kept < row.dim else row.params_before, **own)


def kept_report(row: UnitRow) -> dict:
    """Report row of a unit whose allocation keeps every dim (left as it is)."""
    return unit_report(row, 0.0, 0.0, "all dims kept", kept_dim=row.dim)
