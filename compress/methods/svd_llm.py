"""SVD-LLM truncation-aware whitening (Wang et al., ICLR 2025, arXiv 2403.07378; methods.md §3b, §3c, §10.2).

With the input Gram ``H = X Xᵀ = S Sᵀ``: SVD of ``W S = U Σ Vᵀ``, keep r, ``A = U_r Σ_r^{1/2}``,
``B = Σ_r^{1/2} V_rᵀ S⁻¹``. Then ``||(W − A B) X||_F² = Σ_{i>r} σ_i²`` (Theorem 3.2), so dropping the smallest σ is
loss-optimal and the result is the minimiser of ``||(W − W')X||_F`` over rank-r ``W'``.

lrc computes the same minimiser without inverting anything: ``U_r Σ_r V_rᵀ S⁻¹ = U_r U_rᵀ W``, with ``U`` the
eigenvectors (eigh, float64, round-off clamped) of the output Gram ``W H Wᵀ`` when ``out <= in``, or obtained from the
eigh of ``Sᵀ Wᵀ W S`` with a symmetric root ``S`` shared by Linears with the same input when ``out > in``. This needs
no Cholesky, no ``inv``, and no damping for rank-deficient Grams (the paper code's failure mode, issues #6/#7), and
is several times faster than an SVD of ``W S`` plus an eigendecomposition of ``H`` per matrix.
Only whitening ("step 1") is implemented: the paper's closed-form/LoRA parameter update is a separate step.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..linalg import Spectrum, sym_sqrt, whitened_spectrum
from .base import Method, MethodConfig, register


class SVDLLMConfig(MethodConfig):
    damping: float = Field(0.0, ge=0, description="ridge: H + damping * mean(diag H) * I (0 = exact objective)")


@register
class SVDLLM(Method):
    name = "svd-llm"
    description = "SVD-LLM truncation-aware whitening: optimal rank-r W' for ||(W-W')X||_F (eigh, no inverse)"
    paper = "Wang et al., SVD-LLM, ICLR 2025, arXiv 2403.07378, Sec. 3.1 / Theorem 3.2"
    config_cls = SVDLLMConfig
    needs = ("input_gram",)

    def __init__(self, config=None):
        super().__init__(config)
        self._roots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def spectrum(self, weight, stats) -> Spectrum:
        H = stats["input_gram"].double()
        if self.config.damping > 0:
            H = H + self.config.damping * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype,
                                                                           device=H.device)
        root = None
        if weight.shape[0] > weight.shape[1]:  # share the n x n root between Linears fed by the same Gram
            key = id(stats["input_gram"])
            if key not in self._roots:
                self._roots = {key: (stats["input_gram"], sym_sqrt(H))}
            root = self._roots[key][1]
        spec = whitened_spectrum(weight, H, root)
        spec.input_weighted = self.config.damping == 0
        return spec
