"""LoRD: low-rank decomposition of each Linear (Kaushal, Vaidhya, Rish, arXiv 2309.14021; methods.md §8).

``variant: data`` (LoRD's data-aware form): principal components of the layer's outputs ``Y = W X`` on calibration
text. The output Gram is ``Y Yᵀ = W H Wᵀ`` with the input Gram ``H = X Xᵀ`` (exact for the linear map; a bias stays
on the second factor, untouched), so no extra pass is needed. ``Y Yᵀ = P Λ Pᵀ``, ``A = P_r``, ``B = P_rᵀ W``.
Note: ``P_r P_rᵀ W`` is the minimiser of ``||(W − W') X||_F``, the same optimum SVD-LLM reaches by whitening
(lrc's svd-llm computes it this way too); the methods differ in the factor scaling (A orthonormal here).

``variant: weights`` (data-free): the same projection form on the weight's own left singular vectors,
``A = U_r``, ``B = U_rᵀ W`` (truncated SVD). LoRD picks one rank-reduction fraction per layer type by sweeping;
in lrc that is one stage per layer type with its own ``param_ratio`` or ``rank``.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..linalg import ProjectionSpectrum, Spectrum, whitened_spectrum
from .base import Method, MethodConfig, register


class LoRDConfig(MethodConfig):
    variant: Literal["data", "weights"] = Field("data", description="data: output PCA; weights: truncated SVD")


class OrthonormalProjection(ProjectionSpectrum):
    """``A = P_r`` (orthonormal columns), ``B = P_rᵀ W``: LoRD's factor form."""

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        P = self.U[:, :rank]
        return P, P.T @ self.W


@register
class LoRD(Method):
    name = "lord"
    description = "LoRD: output-space PCA (data) or truncated SVD (weights); A = P_r, B = P_rᵀW"
    paper = "Kaushal, Vaidhya, Rish, LoRD, arXiv 2309.14021"
    config_cls = LoRDConfig
    needs = ("input_gram",)

    def __init__(self, config=None):
        super().__init__(config)
        self.needs = ("input_gram",) if self.config.variant == "data" else ()

    def spectrum(self, weight, stats) -> Spectrum:
        W = weight.double()
        if self.config.variant == "data":
            # eigenvectors of the output Gram Y Yᵀ = W H Wᵀ are the left singular vectors of Y = W X; the whitened
            # solver gets them by the cheaper exact route (m x m eigh when out <= in, n x n otherwise)
            spec = whitened_spectrum(W, stats["input_gram"].double().to(W.device))
            return OrthonormalProjection(sigma=spec.sigma, U=spec.U, W=W, input_weighted=True)
        U, s, _ = torch.linalg.svd(W, full_matrices=False)
        return OrthonormalProjection(sigma=s, U=U, W=W, input_weighted=False)
