"""KFAC-SVD tensor math (LEMS paper, ICML 2026; methods.md §11): two-sided whitening of one weight, float64.

``W`` is m x n (``y = W x``); ``A`` (n x n) ``= Σ x xᵀ`` is the input Gram, ``G`` (m x m) ``= Σ g gᵀ`` the Gram of
the output gradients ``g = ∂L/∂y``. The Kronecker-factored (KFAC) curvature of the loss in ``W`` is ``Ã ⊗ G̃``, so
a change ``ΔW`` costs ``≈ tr(ΔWᵀ G̃ ΔW Ã) = ||Rᵀ ΔW L_A||_F²`` for any roots ``Ã = L_A L_Aᵀ``, ``G̃ = R Rᵀ``.
With ``M = Rᵀ W L_A = U S Vᵀ`` the rank-r minimiser is ``W' = R⁻ᵀ U_r S_r V_rᵀ L_A⁻¹`` and its cost is
``Σ_{i>r} s_i²`` (Eckart–Young on ``M``). Roots come from eigh (``linalg.gram_sqrt``): exact for rank-deficient
Grams (clamped eigenvalues, pseudo-inverses), no Cholesky and no ``inv``.
"""
from __future__ import annotations

from typing import Literal

import torch

from ...linalg import SquareRoot, SVDSpectrum, gram_sqrt, weighted_svd

LeftFactor = Literal["kfac", "reference"]


def shrink(S: torch.Tensor, alpha: float) -> torch.Tensor:
    """Shrinkage towards a scaled identity (methods.md §11 step 1): ``S̃ = (1 − α) S + α · mean(diag S) · I``.

    Float64 and symmetrised; scaling ``S`` scales ``S̃`` alike. A Gram without signal (``mean(diag S) <= 0``, e.g. a
    Linear no gradient reached) becomes ``I``: that side is then weighted uniformly instead of zeroing ``W'``.
    """
    S = S.double()
    S = 0.5 * (S + S.T)
    eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    mu = S.diagonal().mean()
    if not bool(mu > 0):
        return eye
    return (1 - alpha) * S + (alpha * mu) * eye


def right_root(A: torch.Tensor) -> SquareRoot:
    """``L_A`` with ``Ã = L_A L_Aᵀ`` (eigh, no damping) and its pseudo-inverse; ``A`` is the already shrunk Gram.

    The minimiser does not depend on which root of ``Ã`` is used (two roots differ by an orthogonal factor on the
    right, which the SVD of ``M`` absorbs), so the cheapest exact one is taken and may be shared between Linears
    reading the same input.
    """
    return gram_sqrt(A, damping=0.0)


def lower_cholesky(S: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric matrix, with the reference code's fallback on failure.

    On failure ``S`` is shifted by ``(−λ_min + 1e-6 · mean(diag S)) · I`` and the factorisation retried (up to three
    times). The reference's shift is the absolute 1e-6; here it is relative so that the scale of ``S`` still does
    not matter. Float64 (the reference uses float32).
    """
    S = 0.5 * (S.double() + S.double().T)
    eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    tiny = 1e-6 * float(S.diagonal().abs().mean().clamp_min(torch.finfo(torch.float64).tiny))
    for _ in range(4):
        L, info = torch.linalg.cholesky_ex(S)
        if int(info) == 0 and bool(torch.isfinite(L).all()) and bool((L.diagonal() > 0).all()):
            return L
        S = S + (tiny - float(torch.linalg.eigvalsh(S)[0])) * eye
    raise torch.linalg.LinAlgError("lower_cholesky: matrix could not be made positive definite")


def left_root(G: torch.Tensor, left_factor: LeftFactor = "kfac") -> tuple[torch.Tensor, torch.Tensor]:
    """The left transform ``T`` applied as ``M = T W L_A`` and its (pseudo-)inverse; ``G`` is the shrunk Gram.

    ``"kfac"``: ``T = Rᵀ`` for a root ``G̃ = R Rᵀ`` (``R = Q Λ^{1/2}`` from eigh, so ``T = Λ^{1/2} Qᵀ``), which makes
    ``||T ΔW L_A||_F² = tr(ΔWᵀ G̃ ΔW Ã)``, the KFAC objective; any root gives the same ``W'``.
    ``"reference"``: ``T = L_G``, the lower Cholesky factor itself, as the paper's code multiplies it; this minimises
    ``||L_G ΔW L_A||_F²``, which is the KFAC objective only when ``G̃`` is diagonal (then ``L_G = L_Gᵀ``).
    """
    if left_factor == "kfac":
        root = gram_sqrt(G, damping=0.0)
        return root.S.T, root.S_pinv.T
    if left_factor == "reference":
        L = lower_cholesky(G)
        eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
        return L, torch.linalg.solve_triangular(L, eye, upper=False)
    raise ValueError(f"left_factor must be 'kfac' or 'reference', not {left_factor!r}")


def kfac_spectrum(W: torch.Tensor, A: torch.Tensor, G: torch.Tensor, alpha_a: float = 0.1, alpha_g: float = 0.3,
                  left_factor: LeftFactor = "kfac", right: SquareRoot | None = None) -> SVDSpectrum:
    """SVD of ``M = T W L_A`` (methods.md §11 steps 1-4) from the raw Grams ``A`` (n x n) and ``G`` (m x m).

    ``sigma`` are the singular values ``s_i`` of ``M``; ``factors(r)`` are ``T⁺ U_r S_r^{1/2}`` (m x r) and
    ``S_r^{1/2} V_rᵀ L_A⁺`` (r x n), so one factorisation serves every rank. ``right`` is a precomputed
    ``right_root(shrink(A, alpha_a))`` (shared between Linears with the same input). ``input_weighted`` is False:
    the truncation loss ``Σ_{i>r} s_i²`` is the two-sided one, not ``||(W − W') X||²``.
    """
    W = W.double()
    dev = W.device
    if right is None:
        right = right_root(shrink(A.to(dev), alpha_a))
    left, left_pinv = left_root(shrink(G.to(dev), alpha_g), left_factor)
    spec = weighted_svd(W, left=left, left_pinv=left_pinv, right=right.S.to(dev), right_pinv=right.S_pinv.to(dev))
    spec.input_weighted = False
    return spec


def kfac_objective(W: torch.Tensor, W_approx: torch.Tensor, A: torch.Tensor, G: torch.Tensor) -> float:
    """The KFAC loss increase ``tr(ΔWᵀ G ΔW A)`` of ``ΔW = W − W'`` (pass the shrunk Grams for §11's objective)."""
    D = W.double() - W_approx.double()
    return float(((G.double() @ D @ A.double()) * D).sum())
