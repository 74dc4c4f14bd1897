"""Plain truncated SVD (Eckart–Young; methods.md §1): ``W = U Σ Vᵀ``, ``A = U_r Σ_r^{1/2}``, ``B = Σ_r^{1/2} V_rᵀ``.

Optimal for ``||W − W'||_F`` but blind to activations, so it is the baseline every data-aware method must beat.
"""
from __future__ import annotations

from ..linalg import Spectrum, weighted_svd
from .base import Method, register


@register
class SVD(Method):
    name = "svd"
    description = "plain truncated SVD of each weight (data-free baseline, Eckart-Young optimal in ||W-W'||_F)"
    paper = "Eckart & Young 1936; baseline in SVD-LLM (arXiv 2403.07378) Table 1"

    def spectrum(self, weight, stats) -> Spectrum:
        return weighted_svd(weight)
