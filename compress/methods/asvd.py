"""ASVD: activation-aware SVD (Yuan et al. 2023, arXiv 2312.05821, Sec. 3.2; methods.md §3a).

Per input channel scale ``s_j = (mean_t |x_tj|)^α + ε`` (``abs_mean``, α = 0.5, ε = 1e-6 as in the paper's code; or
``abs_max``), exact SVD of ``W diag(s) = U Σ Vᵀ``, then un-scale the right factor:
``A = U_r Σ_r^{1/2}``, ``B = Σ_r^{1/2} V_rᵀ diag(s)⁻¹``. This minimises ``||(W − W') diag(s)||_F`` over rank-r ``W'``.
The paper's code uses the randomized ``torch.svd_lowrank``; lrc uses the exact SVD (reproducible, methods.md §1f).
Its sensitivity-based rank search (STRS) is an allocator, not part of the decomposition.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..linalg import Spectrum, weighted_svd
from .base import Method, MethodConfig, register


class ASVDConfig(MethodConfig):
    alpha: float = Field(0.5, ge=0, description="exponent α of the activation scale (paper default 0.5)")
    scaling: Literal["abs_mean", "abs_max"] = Field("abs_mean", description="per-channel |x| statistic")
    eps: float = Field(1e-6, gt=0, description="added to the scale so dead channels stay invertible")


def asvd_scale(stat: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    return stat.double().clamp_min(0) ** alpha + eps


@register
class ASVD(Method):
    name = "asvd"
    description = "activation-aware SVD: SVD of W·diag(mean|x|^α), right factor un-scaled (exact SVD)"
    paper = "Yuan et al., ASVD, arXiv 2312.05821, Sec. 3.2"
    config_cls = ASVDConfig
    needs = ("input_abs_mean",)

    def __init__(self, config=None):
        super().__init__(config)
        self.needs = (f"input_{self.config.scaling}",)

    def spectrum(self, weight, stats) -> Spectrum:
        s = asvd_scale(stats[self.needs[0]], self.config.alpha, self.config.eps).to(weight.device)
        return weighted_svd(weight, right=s, right_pinv=1 / s)
