"""``energy`` allocator: one global fraction e of spectral energy kept in every matrix, solved for the budget.

Each matrix keeps the smallest rank whose (method-weighted, e.g. whitened) singular values hold e of its energy
``Σσ²``; e is found by bisection so that the targeted parameters are at most ``param_ratio`` of the original.
Matrices with flat spectra get more rank, peaked ones less; a rank that would not save parameters stays dense.
For a compensation stage (EoRA) see ``residual.py``.
"""
from __future__ import annotations

from ..linalg import rank_for_energy
from .budget import bisect, budget_params, params_at, set_rank
from .registry import register_allocator
from .residual import residual_energy


def energy(stage, rows, spectra, options) -> None:
    if rows and rows[0].compensation:
        return residual_energy(stage, rows, spectra)  # EoRA: ranks of residual paths
    budget = budget_params(rows, stage.param_ratio)

    def total(e: float) -> int:
        return sum(params_at(r, rank_for_energy(spectra[r.name], e)) for r in rows)

    e = bisect(total, 0.0, 1.0, budget, increasing=True)
    for r in rows:
        set_rank(r, rank_for_energy(spectra[r.name], e), f"energy {e:.4f}")


register_allocator("energy", energy, reads="method", unit_kinds=("linear", "residual"),
                   description="one global fraction of spectral energy kept in every matrix, solved for the budget")
