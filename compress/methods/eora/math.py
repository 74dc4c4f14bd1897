"""EoRA's math: eigenspace low-rank residual compensation (Liu et al., NVIDIA, arXiv 2410.21271, Sec. 3;
methods.md §7), pure tensors.

For a compressed weight ``W_c`` of ``W`` (any compression: low-rank, quantized, pruned), ``ΔW = W − W_c`` and the input
Gram of the compressed model ``H = X Xᵀ = Q Λ Qᵀ``: SVD of ``ΔW Q Λ^{1/2} = U Σ Vᵀ``, keep r, and

    B = U_r Σ_r^{1/2}   (m × r),     A = Σ_r^{1/2} V_rᵀ Λ^{-1/2} Qᵀ   (r × n),     y = W_c x + B (A x).

Projecting into the eigenspace makes the truncation loss exactly ``||(ΔW − B A) X||_F² = Σ_{i>r} σ_i²``, so the
residual repairs the error that matters on real inputs first; it is the minimiser of that objective over rank-r
residuals. Eigenvalues at or below ``rtol · λ_max`` are dropped (their ``Λ^{-1/2}`` is set to 0: directions the
calibration inputs never reach get no correction) and counted in ``dropped``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...linalg import gram_sqrt

DEFAULT_RTOL = 1e-10


@dataclass
class Residual:
    B: torch.Tensor  # m × r  (PEFT's lora_B)
    A: torch.Tensor  # r × n  (PEFT's lora_A)
    sigma: torch.Tensor  # singular values of ΔW Q Λ^{1/2}, descending
    dropped: int  # eigen-directions of H below the tolerance

    def relative_error(self) -> float:
        """``||(ΔW − B A) X|| / ||ΔW X||``: the fraction of the compression error (on calibration inputs) left."""
        total = float(self.sigma.square().sum())
        r = self.B.shape[1]
        return (float(self.sigma[r:].square().sum()) / total) ** 0.5 if total > 0 else 0.0


def eora_residual(delta: torch.Tensor, H: torch.Tensor, rank: int, rtol: float = DEFAULT_RTOL) -> Residual:
    """Rank-``rank`` residual ``B A`` for the error ``delta = W − W_c`` given the input Gram ``H`` (float64)."""
    root = gram_sqrt(H, damping=0.0, rtol=rtol)  # S = Q Λ^{1/2}, S⁺ = Λ^{-1/2} Qᵀ with tiny eigenvalues dropped
    M = delta.double() @ root.S
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    r = min(rank, s.numel())
    half = s[:r].sqrt()
    B = U[:, :r] * half
    A = (half[:, None] * Vh[:r]) @ root.S_pinv
    return Residual(B=B, A=A, sigma=s, dropped=root.dropped)


def residual_spectrum(delta: torch.Tensor, H: torch.Tensor, rtol: float = DEFAULT_RTOL) -> torch.Tensor:
    """Singular values of ``ΔW Q Λ^{1/2}`` (descending): ``Σ_{i>r} σ_i²`` is the error left at rank r, what a global
    allocator of residual ranks reads."""
    root = gram_sqrt(H, damping=0.0, rtol=rtol)
    return torch.linalg.svdvals(delta.double() @ root.S)
