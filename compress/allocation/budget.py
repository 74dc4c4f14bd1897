"""Shared arithmetic of the allocators: parameters of a row at a knob, and setting the chosen knob, all through the
row's cost model (``cost.py``)."""
from __future__ import annotations

from .cost import cost_of


def params_at(row, rank: int) -> int:
    """Parameters of ``row`` at ``rank`` (aligned first), or dense when that rank would not save any (weights +
    bias)."""
    cost = cost_of(row)
    return cost.params(row, cost.align(row, rank))


def max_saving_rank(row) -> int:
    """Largest rank (a multiple of the row's ``align``) that still saves parameters (0 if none does)."""
    return cost_of(row).max_saving(row)


def settle(row, rank: int, up: bool = False) -> bool:
    """Set ``row.rank`` (aligned, ``up`` or down) and ``row.factorize`` (whether it saves parameters); the latter."""
    cost = cost_of(row)
    row.rank = cost.align(row, rank, up=up)
    row.factorize = cost.saves(row, row.rank)
    return row.factorize


def set_rank(row, rank: int, note: str = "") -> None:
    if settle(row, rank):
        row.note = note
    else:
        row.note = (f"{note}; " if note else "") + cost_of(row).dense_note(row, row.rank)


def budget_params(rows, ratio: float) -> int:
    """The stage's parameter budget: ``ratio`` of its targeted Linears' parameters (weights + biases)."""
    return int(ratio * sum(r.params_before for r in rows))


def bisect(total_at, lo: float, hi: float, budget: float, increasing: bool, iters: int = 60) -> float:
    """The threshold at the budget boundary: with ``increasing`` totals (more kept as t grows) the largest t with
    ``total_at(t) <= budget``, else the smallest such t."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        fits = total_at(mid) <= budget
        if increasing:
            lo, hi = (mid, hi) if fits else (lo, mid)
        else:
            lo, hi = (lo, mid) if fits else (mid, hi)
    return lo if increasing else hi
