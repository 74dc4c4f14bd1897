"""Shared arithmetic of the global allocators: parameters of a row at a rank, and setting the chosen rank."""
from __future__ import annotations

import math

from ..linalg import align_rank, breakeven_rank, saves_parameters


def params_at(row, rank: int) -> int:
    """Parameters of ``row`` at ``rank``, or dense when that rank would not save any (weights + bias)."""
    m, n = row.out_features, row.in_features
    b = m if row.bias else 0
    rank = align_rank(rank, row.align, m, n)
    return rank * (m + n) + b if saves_parameters(m, n, rank) else m * n + b


def max_saving_rank(row) -> int:
    """Largest rank (a multiple of the row's ``align``) that still saves parameters (0 if none does)."""
    r = math.ceil(breakeven_rank(row.out_features, row.in_features)) - 1
    r -= r % row.align
    while r > 0 and not saves_parameters(row.out_features, row.in_features, r):
        r -= row.align
    return max(r, 0)


def set_rank(row, rank: int, note: str = "") -> None:
    rank = align_rank(rank, row.align, row.out_features, row.in_features)
    row.rank = rank
    row.factorize = saves_parameters(row.out_features, row.in_features, rank)
    row.note = note if row.factorize else (f"{note}; " if note else "") + \
        f"kept dense: rank {rank} >= break-even {breakeven_rank(row.out_features, row.in_features):.1f}"


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
