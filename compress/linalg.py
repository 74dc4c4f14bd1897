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

    The result is rounded down to a multiple of ``align`` (tensor-core friendly shapes, ``align_rank``) and is at
    least ``min(align, m, n)``.
    """
    return align_rank(max(1, int(ratio * m * n // (m + n))), align, m, n)


def align_rank(rank: int, align: int, m: int, n: int, up: bool = False) -> int:
    """``rank`` capped at ``min(m, n)`` and rounded to a multiple of ``align`` (down, or ``up`` for a floor such as an
    energy target), never below ``min(align, m, n)``: every allocator's ranks go through here."""
    cap = min(m, n)
    r = min(max(int(rank), 1), cap)
    if align > 1:
        r = -(-r // align) * align if up else (r // align) * align
        r = min(r, cap) if r > cap else r
    return max(r, min(align, cap))


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


class Spectrum:
    """The rank-r solutions of one weighted low-rank problem: ``sigma`` (descending) and ``factors(r)``.

    ``truncation_loss(r)`` is the squared weighted error of keeping r values, ``sum(sigma[r:]**2)``; when
    ``input_weighted`` is True that weight is the input Gram, so the loss is exactly ``||(W − A B) X||_F²``.
    """

    sigma: torch.Tensor
    input_weighted: bool = False

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def truncation_loss(self, rank: int) -> float:
        """Sum of the dropped σ² (SVD-LLM Theorem 3.2 for the whitened problem)."""
        return float((self.sigma[rank:].double() ** 2).sum())

    def relative_error(self, rank: int) -> float:
        total = float((self.sigma.double() ** 2).sum())
        return (self.truncation_loss(rank) / total) ** 0.5 if total > 0 else 0.0


@dataclass
class SVDSpectrum(Spectrum):
    """SVD of a transformed weight ``L W R = U Σ Vᵀ`` together with the inverses that undo the transform.

    ``factors(r)`` returns ``A = L⁺ U_r Σ_r^{1/2}`` and ``B = Σ_r^{1/2} V_rᵀ R⁺`` so that ``A B`` is the rank-r
    solution of the weighted problem ``min ||L (W − W') R||_F``. ``None`` stands for the identity; a 1-D tensor
    for a diagonal matrix (ASVD, FWSVD scalings: applied by broadcasting, never materialised).
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
        return _left(self.left_pinv, A), _right(B, self.right_pinv)


def _left(L: torch.Tensor | None, M: torch.Tensor) -> torch.Tensor:
    """``L @ M`` (``L`` a matrix, a diagonal given as a vector, or None for the identity)."""
    if L is None:
        return M
    return L.to(M.dtype)[:, None] * M if L.dim() == 1 else L.to(M.dtype) @ M


def _right(M: torch.Tensor, R: torch.Tensor | None) -> torch.Tensor:
    """``M @ R`` (``R`` a matrix, a diagonal given as a vector, or None for the identity)."""
    if R is None:
        return M
    return M * R.to(M.dtype) if R.dim() == 1 else M @ R.to(M.dtype)


@dataclass
class ProjectionSpectrum(Spectrum):
    """``W' = U_r U_rᵀ W`` with ``U`` the top eigenvectors of the output Gram ``W H Wᵀ = (W X)(W X)ᵀ``.

    This is the minimiser of ``||(W − W') X||_F`` over rank-r ``W'`` (the left singular vectors of ``W X``), i.e. the
    SVD-LLM solution ``U_r Σ_r V_rᵀ S⁻¹`` written without any inverse: ``U_r Σ_r V_rᵀ S⁻¹ = U_r U_rᵀ W S S⁻¹``.
    Factors are balanced as ``A = U_r Σ_r^{1/2}``, ``B = Σ_r^{-1/2} U_rᵀ W`` (unscaled where σ is ~0).
    """

    sigma: torch.Tensor
    U: torch.Tensor
    W: torch.Tensor
    input_weighted: bool = True

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sigma[:rank]
        scale = torch.where(s > s[:1].clamp_min(1e-300) * 1e-10, s.clamp_min(1e-300).sqrt(), torch.ones_like(s))
        U = self.U[:, :rank]
        return U * scale, (U.T @ self.W) / scale[:, None]


def whitened_spectrum(W: torch.Tensor, H: torch.Tensor, root: torch.Tensor | None = None) -> ProjectionSpectrum:
    """Spectrum of ``W X`` from ``W`` (m x n) and ``H = X Xᵀ``, by the cheaper of two exact routes (float64).

    m <= n: eigh of the m x m output Gram ``W H Wᵀ``. m > n: with any square root ``H = S Sᵀ`` (pass ``root`` to
    share it between Linears with the same input), eigh of the n x n ``Sᵀ Wᵀ W S`` gives ``V``, then
    ``U = W S V Σ⁻¹``. Negative round-off eigenvalues are clamped to 0; no inverse of ``H`` is ever formed.
    """
    W, H = W.double(), H.double()
    m, n = W.shape
    if m <= n:
        lam, U = torch.linalg.eigh(W @ H @ W.T)
        lam, U = lam.flip(0).clamp_min(0), U.flip(1)
        return ProjectionSpectrum(sigma=lam.sqrt(), U=U, W=W)
    S = root if root is not None else sym_sqrt(H)
    WS = W @ S
    lam, V = torch.linalg.eigh(WS.T @ WS)
    lam, V = lam.flip(0).clamp_min(0), V.flip(1)
    sigma = lam.sqrt()
    tiny = sigma <= sigma[:1].clamp_min(1e-300) * 1e-12
    U = (WS @ V) / torch.where(tiny, torch.ones_like(sigma), sigma)
    U[:, tiny] = 0.0  # directions W X does not reach: never selected before the non-zero ones
    return ProjectionSpectrum(sigma=sigma, U=U, W=W)


def sym_sqrt(H: torch.Tensor) -> torch.Tensor:
    """``S = Q Λ^{1/2}`` with ``H = Q Λ Qᵀ`` (eigh, float64, negative round-off clamped), so ``S Sᵀ = H``."""
    lam, Q = torch.linalg.eigh(0.5 * (H.double() + H.double().T))
    return Q * lam.clamp_min(0).sqrt()


def weighted_svd(
    W: torch.Tensor,
    left: torch.Tensor | None = None,
    left_pinv: torch.Tensor | None = None,
    right: torch.Tensor | None = None,
    right_pinv: torch.Tensor | None = None,
) -> "SVDSpectrum":
    """Exact SVD of ``left @ W @ right`` in float64 (transforms optional; a 1-D transform is a diagonal)."""
    M = _right(_left(left, W.double()), right)
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    return SVDSpectrum(sigma=s, U=U, Vh=Vh, left_pinv=left_pinv, right_pinv=right_pinv)


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


def dense_target(W: torch.Tensor, H_c: torch.Tensor, C: torch.Tensor, damping: float = 0.1
                 ) -> torch.Tensor:
    """Weight that maps the compressed model's inputs to the dense model's outputs, shrunk towards ``W``.

    With dense inputs ``X``, compressed-path inputs ``X̃`` (same tokens), ``H_c = X̃ X̃ᵀ`` and ``C = X X̃ᵀ``, and
    ``μ = damping · mean(diag H_c)``: ``W_t = argmin ||W X − W' X̃||² + μ ||W' − W||² = (W C + μ W)(H_c + μ I)⁻¹``
    (float64, eigh). ``damping → 0`` is the plain least-squares fit, ``damping → ∞`` gives back ``W`` (the ``layer``
    objective). ``damping = 0`` is the least-squares fit on the directions ``X̃`` spans and ``W`` on the others
(no division by a zero eigenvalue). For any rank-r ``W'``, ``||W X − W' X̃||² = const + ||(W_t − W') X̃||²`` when ``μ = 0``, so the rank-r
    solution is the whitened one for ``W_t`` on ``H_c``.
    """
    H, W = H_c.double(), W.double()
    mu = damping * H.diagonal().mean().clamp_min(0)
    lam, Q = torch.linalg.eigh(0.5 * (H + H.T))
    lam = lam.clamp_min(0)
    # directions the compressed inputs never take (λ ≈ 0) cannot be fitted: keep W there, the μ → 0 limit of the
    # damped solution (there W C q = 0), so ``damping: 0`` on a rank-deficient Gram is the minimum-change fit
    null = lam <= lam.max().clamp_min(1e-300) * 1e-10 if mu == 0 else torch.zeros_like(lam, dtype=torch.bool)
    fitted = (W @ C.double() + mu * W) @ Q / torch.where(null, torch.ones_like(lam), lam + mu)
    return torch.where(null, W @ Q, fitted) @ Q.T


def dense_objective_error(W, W_approx, H_d, C, H_c) -> float:
    """``||W X − W' X̃||_F / ||W X||_F`` from ``H_d = X Xᵀ``, ``C = X X̃ᵀ``, ``H_c = X̃ X̃ᵀ``."""
    W, Wp = W.double(), W_approx.double()
    total = ((W @ H_d.double()) * W).sum()
    err2 = total - 2 * ((W @ C.double()) * Wp).sum() + ((Wp @ H_c.double()) * Wp).sum()
    return float((err2.clamp_min(0) / total.clamp_min(1e-300)).sqrt())
