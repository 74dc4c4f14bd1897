"""Cost models: what a unit stores at a given budget knob, the one place allocators turn a knob into parameters.

A plan row names its cost model (``row.cost_model``); its knob is the value the allocators move (a rank here, kept
dims for structured units). Every allocator asks the row's model, never ``r(m+n)`` itself:

- ``params(row, knob)``: parameters of the unit at that knob (weights + biases), the knob taken as given;
- ``align(row, knob, up)``: the nearest valid knob (a multiple of ``row.align``, down or ``up``);
- ``knob_for(row, kept_fraction)``: the knob keeping about that fraction (aligned);
- ``saves(row, knob)``: whether the unit at that knob stores fewer parameters than dense (else it stays dense);
- ``extra(row, knob)``: parameters gained over ``row.params_before`` (negative when it saves);
- ``storage_bytes(row, knob, bytes_per_param)``: bytes on disk; ``describe(row)``: the knob in words (``lrc plan``).

``lowrank``: ``r(m+n)`` + bias, or dense ``m·n`` + bias when rank r would not save parameters. ``residual`` (EoRA):
the module as it is plus a residual path, ``params_before + r(m+n)``; its fraction is EXTRA parameters ``ρ·m·n``.
"""
from __future__ import annotations

import math

from ..linalg import align_rank, breakeven_rank, rank_for_ratio, saves_parameters


class CostModel:
    """Base class; subclasses set ``name`` and implement ``params``, ``knob_for``, ``align`` and ``describe``."""

    name: str = ""

    def params(self, row, knob: int) -> int:
        raise NotImplementedError

    def knob_for(self, row, kept_fraction: float) -> int:
        raise NotImplementedError

    def align(self, row, knob: int, up: bool = False) -> int:
        raise NotImplementedError

    def describe(self, row) -> str:
        raise NotImplementedError

    def saves(self, row, knob: int) -> bool:
        return self.params(row, knob) < row.params_before

    def extra(self, row, knob: int) -> int:
        return self.params(row, knob) - row.params_before

    def storage_bytes(self, row, knob: int, bytes_per_param: float) -> int:
        return int(self.params(row, knob) * bytes_per_param)

    def max_saving(self, row) -> int:
        """Largest valid knob that still saves parameters (0 if none does)."""
        raise NotImplementedError

    def dense_note(self, row, knob: int) -> str:
        """Why the unit stays dense at ``knob`` (the plan's and report's note)."""
        return f"kept dense: {self.describe(row)} saves no parameters"


class LowRank(CostModel):
    """A Linear factorised at rank r: ``r(m+n)`` weights + bias, or the dense matrix when r saves nothing."""

    name = "lowrank"

    def params(self, row, knob: int) -> int:
        m, n = row.out_features, row.in_features
        b = m if row.bias else 0
        return knob * (m + n) + b if saves_parameters(m, n, knob) else m * n + b

    def knob_for(self, row, kept_fraction: float) -> int:
        return rank_for_ratio(row.out_features, row.in_features, kept_fraction, row.align)

    def align(self, row, knob: int, up: bool = False) -> int:
        return align_rank(knob, row.align, row.out_features, row.in_features, up=up)

    def saves(self, row, knob: int) -> bool:
        return saves_parameters(row.out_features, row.in_features, knob)

    def max_saving(self, row) -> int:
        m, n = row.out_features, row.in_features
        r = math.ceil(breakeven_rank(m, n)) - 1
        r -= r % row.align
        while r > 0 and not saves_parameters(m, n, r):
            r -= row.align
        return max(r, 0)

    def dense_note(self, row, knob: int) -> str:
        return f"kept dense: rank {knob} >= break-even {breakeven_rank(row.out_features, row.in_features):.1f}"

    def describe(self, row) -> str:
        rank = "?" if row.rank is None else row.rank
        return f"rank {rank}" + (" (kept dense)" if row.factorize is False else "")


class Residual(LowRank):
    """A module kept as it is plus a rank-r residual path (EoRA): ``params_before + r(m+n)``; ``kept_fraction`` of
    ``knob_for`` is the EXTRA fraction ``ρ`` of ``m·n`` (rank ``floor(ρ·m·n/(m+n))``)."""

    name = "residual"

    def params(self, row, knob: int) -> int:
        return row.params_before + self.extra(row, knob)

    def extra(self, row, knob: int) -> int:
        return knob * (row.out_features + row.in_features)

    def saves(self, row, knob: int) -> bool:
        return False

    def max_saving(self, row) -> int:
        return 0

    def describe(self, row) -> str:
        return f"residual rank {'?' if row.rank is None else row.rank}"


COST_MODELS: dict[str, CostModel] = {}


def register_cost_model(model: CostModel) -> CostModel:
    """Add ``model`` (an instance) to ``COST_MODELS`` under ``model.name``."""
    COST_MODELS[model.name] = model
    return model


def cost_of(row, default: str = "lowrank") -> CostModel:
    """The cost model of ``row`` (``row.cost_model``; ``default`` for a row object without one)."""
    name = getattr(row, "cost_model", None) or default
    try:
        return COST_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown cost model {name!r}; registered: {', '.join(sorted(COST_MODELS))}") from None


register_cost_model(LowRank())
register_cost_model(Residual())
