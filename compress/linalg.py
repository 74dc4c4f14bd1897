"""Pure tensor math shared by the methods: rank formula, whitening square roots, weighted truncated SVD.

Notation follows ../shared/methods.md: a Linear has weight ``W`` (m x n, ``y = W x``), calibration inputs
``X`` (n x N), input Gram ``H = X Xᵀ``. A rank-r factorisation is ``W' = A B`` with ``B`` (r x n) applied first and
``A`` (m x r) second, so the module stores ``r (m + n)`` parameters instead of ``m n``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def breakeven_rank(m: int, n: int) -> float:
    """The rank at which ``r (m + n) == m n``: factorising at or above it saves nothing."""
    return m * n / (m + n)


def rank_for_ratio(m: int, n: int, ratio: float, align: int = 1) -> int:
    """Rank that keeps a fraction ``ratio`` of an m x n matrix's parameters: ``floor(ratio * m n / (m + n))``.

    The result is rounded down to a multiple of ``align`` (tensor-core friendly shapes) and is at least 1.
    """
    r = int(ratio * m * n // (m + n))
    if align > 1:
        r = (r // align) * align
    return max(1, r)


def saves_parameters(m: int, n: int, rank: int) -> bool:
    """True when a rank-``rank`` factorisation stores strictly fewer parameters than the dense matrix."""
    return rank * (m + n) < m * n


def rank_for_energy(sigma: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep a fraction ``energy`` of ``sum(sigma**2)``."""
    e = sigma.double() ** 2
    total = e.sum()
    if total <= 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1


@dataclass
class SquareRoot:
    """``S`` with ``H ≈ S Sᵀ`` and its pseudo-inverse ``S_pinv``; ``dropped`` counts clamped eigen-directions."""

    S: torch.Tensor
    S_pinv: torch.Tensor
    dropped: int


def gram_sqrt(H: torch.Tensor, damping: float = 1e-6, rtol: float | None = None) -> SquareRoot:
    """Symmetric square root of a Gram matrix by eigendecomposition (SVD-LLM V2, methods.md §3c and §10.2).

    ``H + damping * mean(diag H) * I = Q Λ Qᵀ``; ``S = Q Λ^{1/2}``, ``S⁺ = Λ^{-1/2} Qᵀ`` with eigenvalues below
    ``rtol * λ_max`` (default ``n * eps``) clamped: their inverse square roots are set to 0, so a rank-deficient
    or tiny calibration set still gives finite factors. Computed in float64.
    """
    H = H.double()
    H = 0.5 * (H + H.T)
    n = H.shape[0]
    scale = H.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    Hd = H + damping * scale * torch.eye(n, dtype=H.dtype, device=H.device)
    lam, Q = torch.linalg.eigh(Hd)
    if rtol is None:
        rtol = n * torch.finfo(torch.float64).eps
    keep = lam > rtol * lam.max().clamp_min(0)
    lam = torch.where(keep, lam, torch.zeros_like(lam))
    root = lam.sqrt()
    inv_root = torch.where(keep, 1.0 / root.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(root))
    return SquareRoot(S=Q * root, S_pinv=inv_root[:, None] * Q.T, dropped=int((~keep).sum()))


@dataclass
class Spectrum:
    """SVD of a transformed weight ``L W R = U Σ Vᵀ`` together with the inverses that undo the transform.

    ``factors(r)`` returns ``A = L⁺ U_r Σ_r^{1/2}`` and ``B = Σ_r^{1/2} V_rᵀ R⁺`` so that ``A B`` is the rank-r
    solution of the weighted problem ``min ||L (W − W') R||_F``. ``None`` stands for the identity.
    """

    U: torch.Tensor
    sigma: torch.Tensor
    Vh: torch.Tensor
    left_pinv: torch.Tensor | None = None
    right_pinv: torch.Tensor | None = None

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.sigma[:rank].sqrt()
        A = self.U[:, :rank] * root
        B = root[:, None] * self.Vh[:rank]
        if self.left_pinv is not None:
            A = self.left_pinv @ A
        if self.right_pinv is not None:
            B = B @ self.right_pinv
        return A, B

    def truncation_loss(self, rank: int) -> float:
        """Squared weighted error of keeping ``rank`` values: the sum of the dropped σ² (SVD-LLM Theorem 3.2)."""
        return float((self.sigma[rank:].double() ** 2).sum())


def weighted_svd(
    W: torch.Tensor,
    left: torch.Tensor | None = None,
    left_pinv: torch.Tensor | None = None,
    right: torch.Tensor | None = None,
    right_pinv: torch.Tensor | None = None,
) -> Spectrum:
    """Exact SVD of ``left @ W @ right`` in float64 (transforms optional)."""
    M = W.double()
    if left is not None:
        M = left.double() @ M
    if right is not None:
        M = M @ right.double()
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    return Spectrum(U, s, Vh, left_pinv, right_pinv)


def weighted_error(W: torch.Tensor, W_approx: torch.Tensor, H: torch.Tensor | None) -> float:
    """Relative error ``||(W − W')X||_F / ||W X||_F`` computed from the Gram ``H = X Xᵀ`` (plain Frobenius if None)."""
    W = W.double()
    D = W - W_approx.double()
    if H is None:
        return float(D.norm() / W.norm().clamp_min(1e-300))
    H = H.double()
    num = ((D @ H) * D).sum().clamp_min(0)
    den = ((W @ H) * W).sum().clamp_min(1e-300)
    return float((num / den).sqrt())
