"""FWSVD: Fisher-weighted SVD (Hsu et al., ICLR 2022, arXiv 2207.00112, Sec. 3; methods.md §2).

Empirical Fisher of each weight, ``I_ij = Σ_d (∂L_d/∂W_ij)²`` over calibration sequences d (causal-LM loss), summed to
one importance per row: ``Î = Σ_j I_ij``. With ``D = diag(√Î)`` the weighted problem ``min ||D (W − A B)||_F`` is
solved by the SVD ``D W = U Σ Vᵀ``, ``A = D⁻¹ U_r Σ_r^{1/2}``, ``B = Σ_r^{1/2} V_rᵀ`` (the paper puts all of Σ in A;
the product is the same).

Orientation (``axis``): the paper weights the rows of its W, whose layout (TF/HF-BERT, in × out) makes a "row" an
**input** feature. ``axis: input`` (default) is that reading and the one the public reimplementations use: one weight
per input feature of ``nn.Linear``, summed over outputs, i.e. ``SVD(W D)``, ``B = Σ_r^{1/2} V_rᵀ D⁻¹`` — the scaling
comparable to ASVD and SVD-LLM. ``axis: output`` weights each output row of the ``nn.Linear`` weight instead.
The Fisher sums come from ``engine/gradients.py`` (one backward pass per calibration sequence, cached on disk).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..linalg import Spectrum, weighted_svd
from .base import Method, MethodConfig, register


class FWSVDConfig(MethodConfig):
    axis: Literal["input", "output"] = Field("input", description="which side of W the Fisher weight scales")
    rel_floor: float = Field(1e-8, gt=0, description="importances below rel_floor·max are raised to it (no 1/0)")


def fisher_weight(importance: torch.Tensor, rel_floor: float) -> torch.Tensor:
    imp = importance.double().clamp_min(0)
    return imp.clamp_min(float(imp.max()) * rel_floor + 1e-300).sqrt()


@register
class FWSVD(Method):
    name = "fwsvd"
    description = "Fisher-weighted SVD: rows (input features by default) weighted by summed squared LM-loss gradients"
    paper = "Hsu et al., Language model compression with weighted low-rank factorization, ICLR 2022"
    config_cls = FWSVDConfig
    needs = ("fisher",)

    def spectrum(self, weight, stats) -> Spectrum:
        if self.config.axis == "input":
            d = fisher_weight(stats["fisher_in"], self.config.rel_floor).to(weight.device)
            return weighted_svd(weight, right=d, right_pinv=1 / d)
        d = fisher_weight(stats["fisher_out"], self.config.rel_floor).to(weight.device)
        return weighted_svd(weight, left=d, left_pinv=1 / d)
