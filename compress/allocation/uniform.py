"""Uniform allocation (SVD-LLM, ASVD default): the same kept fraction ρ for every matrix, per-matrix rank formula
(the row's cost model's ``knob_for``). An ``energy`` budget is the one decided later, from each matrix's own spectrum
during compression: ``decide_from_spectrum``."""
from __future__ import annotations

from ..linalg import rank_for_energy
from .budget import settle
from .cost import cost_of
from .registry import register_allocator


def decide(row, rank: int, up: bool = False) -> None:
    """Set ``row.rank``/``row.factorize``; a rank that saves nothing keeps the matrix dense (noted in the report).
    The rank is aligned to the row's ``align`` (rounded ``up`` for an energy target, so the energy stays a floor)."""
    if not settle(row, rank, up=up):
        row.note = cost_of(row).dense_note(row, row.rank)


def decide_from_spectrum(stage, row, sigma) -> None:
    """The rank of a row left undecided by the plan (an ``energy`` budget): the smallest one whose singular values
    ``sigma`` (the method's spectrum of this matrix) hold ``stage.energy`` of their energy, rounded up to ``align``.
    A row already decided is left as it is."""
    if row.rank is None and row.factorize is None:
        decide(row, rank_for_energy(sigma, stage.energy), up=True)


def residual_rank(row, kind: str, value: float) -> None:
    """A compensation row: ``rank`` as given, or ``param_ratio`` read as EXTRA parameters ``ρ·m·n`` (EoRA)."""
    cost = cost_of(row, "residual")
    rank = int(value) if kind == "rank" else cost.knob_for(row, value)
    row.rank, row.factorize = cost.align(row, rank), True
    row.note = f"residual rank {row.rank}"


def uniform(stage, rows, spectra=None, options=None) -> None:
    kind, value = stage.budget
    for row in rows:
        if row.compensation:
            residual_rank(row, kind, value)
            continue
        if kind == "param_ratio":
            decide(row, cost_of(row).knob_for(row, value))
        elif kind == "rank":
            decide(row, int(value))
        else:  # energy: chosen per matrix from its spectrum during compression (decide_from_spectrum)
            row.rank, row.factorize, row.note = None, None, f"rank from spectrum (energy {value})"


# every row kind a method plans: each row's knob comes from its own cost model (``knob_for``)
register_allocator("uniform", uniform, reads=None, unit_kinds=("linear", "residual"), any_kind=True,
                   description="the same kept ratio for every matrix (the SVD-LLM and ASVD default)")
