"""Uniform allocation (SVD-LLM, ASVD default): the same kept fraction ρ for every matrix, per-matrix rank formula."""
from __future__ import annotations

from ..linalg import align_rank, breakeven_rank, rank_for_ratio, saves_parameters


def decide(row, rank: int, up: bool = False) -> None:
    """Set ``row.rank``/``row.factorize``; a rank that saves nothing keeps the matrix dense (noted in the report).
    The rank is aligned to the row's ``align`` (rounded ``up`` for an energy target, so the energy stays a floor)."""
    m, n = row.out_features, row.in_features
    rank = align_rank(rank, row.align, m, n, up=up)
    row.rank = rank
    row.factorize = saves_parameters(m, n, rank)
    if not row.factorize:
        row.note = f"kept dense: rank {rank} >= break-even {breakeven_rank(m, n):.1f}"


def residual_rank(row, kind: str, value: float, align: int = 1) -> None:
    """A compensation row: ``rank`` as given, or ``param_ratio`` read as EXTRA parameters ``ρ·m·n`` (EoRA)."""
    m, n = row.out_features, row.in_features
    rank = int(value) if kind == "rank" else rank_for_ratio(m, n, value, align)
    row.rank, row.factorize = align_rank(rank, align, m, n), True
    row.note = f"residual rank {row.rank}"


def uniform(stage, rows, spectra=None, options=None) -> None:
    kind, value = stage.budget
    for row in rows:
        if row.compensation:
            residual_rank(row, kind, value, stage.align)
            continue
        if kind == "param_ratio":
            decide(row, rank_for_ratio(row.out_features, row.in_features, value, stage.align))
        elif kind == "rank":
            decide(row, int(value))
        else:  # energy: chosen per matrix from its spectrum during compression
            row.rank, row.factorize, row.note = None, None, f"rank from spectrum (energy {value})"
