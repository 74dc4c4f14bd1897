"""SVD-LLM truncation-aware whitening (Wang et al., ICLR 2025, arXiv 2403.07378; methods.md §3b, §3c, §10.2).

With the input Gram ``H = X Xᵀ = S Sᵀ``: SVD of ``W S = U Σ Vᵀ``, keep r, ``A = U_r Σ_r^{1/2}``,
``B = Σ_r^{1/2} V_rᵀ S⁻¹``. Then ``||(W − A B) X||_F² = Σ_{i>r} σ_i²`` (Theorem 3.2), so dropping the smallest σ is
loss-optimal and the result is the minimiser of ``||(W − W')X||_F`` over rank-r ``W'``.

The square root comes from ``eigh`` of the damped Gram with small eigenvalues clamped (SVD-LLM V2's formulation),
not the paper code's Cholesky + ``inv``, which fails on rank-deficient Grams. Only whitening ("step 1") is
implemented: the paper's closed-form/LoRA parameter update is a separate, training-like step.
"""
from __future__ import annotations

from pydantic import Field

from ..linalg import Spectrum, gram_sqrt, weighted_svd
from .base import Method, MethodConfig, register


class SVDLLMConfig(MethodConfig):
    damping: float = Field(1e-6, ge=0, description="added to H as damping * mean(diag H) * I before eigh")
    rtol: float | None = Field(None, gt=0, description="eigenvalues below rtol * λ_max are clamped (default n·eps)")


@register
class SVDLLM(Method):
    name = "svd-llm"
    description = "SVD-LLM truncation-aware whitening: SVD of W·S with H = XᵀX = S·Sᵀ (eigh, damped, clamped)"
    paper = "Wang et al., SVD-LLM, ICLR 2025, arXiv 2403.07378, Sec. 3.1 / Theorem 3.2"
    config_cls = SVDLLMConfig
    needs = ("input_gram",)

    def spectrum(self, weight, stats) -> Spectrum:
        root = gram_sqrt(stats["input_gram"], damping=self.config.damping, rtol=self.config.rtol)
        self._dropped = root.dropped
        return weighted_svd(weight, right=root.S, right_pinv=root.S_pinv)

    def notes(self) -> dict:
        return {"clamped_eigenvalues": getattr(self, "_dropped", 0)}
