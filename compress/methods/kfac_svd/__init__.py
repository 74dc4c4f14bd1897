"""KFAC-SVD: two-sided (Kronecker-factored curvature) whitening (LEMS paper, ICML 2026; methods.md §11).

With the input Gram ``A = Σ x xᵀ`` (n x n) and the output-gradient Gram ``G = Σ g gᵀ`` (m x m, ``g = ∂L/∂y`` of the
next-token cross-entropy), the KFAC approximation of the loss increase of ``ΔW = W − W'`` is
``tr(ΔWᵀ G̃ ΔW Ã) = ||L_Gᵀ ΔW L_A||_F²`` with the shrunk Grams ``S̃ = (1 − α) S + α · mean(diag S) · I``
(α = 0.1 for A, 0.3 for G) and ``Ã = L_A L_Aᵀ``, ``G̃ = L_G L_Gᵀ``. SVD ``M = L_Gᵀ W L_A = U S Vᵀ``, keep r:
``A_out = L_G⁻ᵀ U_r S_r^{1/2}`` (m x r), ``B_in = S_r^{1/2} V_rᵀ L_A⁻¹`` (r x n); the loss is ``Σ_{i>r} s_i²``, so
the result is the rank-r minimiser of the KFAC objective. ``G = I`` (and α_A = 0) is SVD-LLM, ``A = G = I`` plain SVD.

``left_factor: kfac`` (default) is that correct objective. The paper's code multiplies by the lower Cholesky factor
``L_G`` itself (``M = L_G W L_A``), which equals the above only when ``G̃`` is diagonal; ``left_factor: reference``
reproduces that code (the objective behind the paper's reported numbers). lrc's roots are eigh-based in float64
(exact for rank-deficient Grams, pseudo-inverses), not the reference's float32 Cholesky; the math lives in
``kfac_svd/math.py``.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...linalg import SquareRoot, Spectrum
from ..base import Method, MethodConfig, register
from .math import kfac_spectrum, right_root, shrink


class KFACSVDConfig(MethodConfig):
    alpha_a: float = Field(0.1, ge=0, lt=1, description="shrinkage of the input Gram A towards mean(diag A)·I "
                           "(paper: 0.1)")
    alpha_g: float = Field(0.3, ge=0, lt=1, description="shrinkage of the output-gradient Gram G towards "
                           "mean(diag G)·I (paper: 0.3)")
    left_factor: Literal["kfac", "reference"] = Field(
        "kfac", description="kfac: L_Gᵀ on the left, the exact KFAC objective tr(ΔWᵀ G ΔW A) (default); reference: "
        "L_G as the paper's code applies it (the reference code; the KFAC objective only for a diagonal G)")


@register
class KFACSVD(Method):
    name = "kfac-svd"
    description = ("KFAC-SVD two-sided whitening: optimal rank-r W' for the KFAC loss tr(ΔWᵀ G ΔW A), A the input "
                   "Gram, G the output-gradient Gram")
    paper = ("LEMS paper (ICML 2026), KFAC-SVD: two-sided whitening by the input and output-gradient Grams, "
             "M = L_Gᵀ W L_A (methods.md §11)")
    config_cls = KFACSVDConfig
    needs = ("input_gram", "output_grad_gram")

    def __init__(self, config=None):
        super().__init__(config)
        self._roots: dict[int, tuple[torch.Tensor, SquareRoot]] = {}

    def spectrum(self, weight, stats) -> Spectrum:
        cfg = self.config
        A = stats["input_gram"]
        key = id(A)  # share L_A between Linears fed by the same Gram (q/k/v, gate/up); the tensor is kept alive
        if key not in self._roots:
            self._roots = {key: (A, right_root(shrink(A.to(weight.device), cfg.alpha_a)))}
        return kfac_spectrum(weight, A, stats["output_grad_gram"], cfg.alpha_a, cfg.alpha_g, cfg.left_factor,
                             right=self._roots[key][1])
