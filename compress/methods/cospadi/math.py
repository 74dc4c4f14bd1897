"""CoSpaDi's math (Makhov et al., arXiv 2509.22075, §3-3.4, Alg. 1, App. A.1-A.5; methods.md §6), pure tensors.

A weight ``W`` (m × n, torch layout) is replaced by ``W̃ = C Dᵀ``: a dictionary ``D`` (n × k atoms, on the input side)
and coefficients ``C`` (m × k) with exactly ``s`` non-zeros per row, i.e. per output neuron. In the paper's layout
(``W_p = Wᵀ``, n × m) each column of ``W_p`` is a signal coded by ``s`` atoms. The objective is data-aware:
``‖X(W_p − W̃_p)‖_F = ‖R(W_p − W̃_p)‖_F`` for any root ``RᵀR = H = XᵀX`` (§3.1), so the dictionary is learned on the
whitened weight ``W_L = R W_p`` and de-whitened by solving ``R D = D_L`` through the Gram's eigendecomposition
(``linalg.gram_sqrt``: rank-deficient Grams handled by clamping, no Cholesky, no inverse of ``H``).

Learning (Alg. 1): ``T`` rounds of sparse coding by Batch-OMP (Rubinstein et al. 2008: Gram trick, incremental
Cholesky, every column of the matrix at once as tensor operations) and the K-SVD atom update (rank-1 by power
iteration on each atom's residual, supports fixed). Storage (§3.4, Eq. 10): values in the checkpoint's dtype plus a
1-bit mask over the k × m coefficient matrix; ``dict_size`` turns a kept storage fraction into ``(k, s)``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ...linalg import gram_sqrt


def dict_size(out_features: int, in_features: int, kept: float, rho: float = 2.0, value_bits: int = 16,
              mask_bits: float = 1.0, layers: int = 1) -> tuple[int, int]:
    """``(k, s)`` storing about ``kept`` of the dense matrix (Eq. 10 / Eq. 49, with ``s = ⌊k/ρ⌋``).

    Per layer the module stores ``n·k`` dictionary values (once per group of ``layers`` sharing it, §3.3),
    ``s·m`` coefficient values and ``k·m`` mask bits; counted in words of ``value_bits``:
    ``k = ⌊kept·L·m·n / (n + L·m·(1/ρ + mask_bits/value_bits))⌋``. With 16-bit values and a 1-bit mask this is the
    paper's Eq. 10 (Qwen3-8B 4096 × 12288 at 0.8: (3657, 1828)); ``mask_bits = 0`` is Eq. 11 ((3932, 1966)).
    """
    m, n, L = out_features, in_features, layers
    denom = n + L * m * (1.0 / rho + mask_bits / value_bits)
    k = math.floor(kept * L * m * n / denom + 1e-9)
    return k, nnz_for(k, rho)


def nnz_for(k: int, rho: float) -> int:
    """``s = ⌊k/ρ⌋`` non-zeros per output for ``k`` atoms (Eq. 49; the one place this rounding is made)."""
    return math.floor(k / rho + 1e-9)


def dict_storage_bits(out_features: int, in_features: int, k: int, s: int, value_bits: int = 16,
                      mask_bits: float = 1.0, layers: int = 1, bias: bool = False) -> float:
    """Bits a group of ``layers`` modules stores: one dictionary, each layer's values, mask (and bias)."""
    m, n = out_features, in_features
    return value_bits * (n * k + layers * (s * m + (m if bias else 0))) + layers * mask_bits * k * m


@dataclass
class Whitening:
    """``R`` (n × n) with ``RᵀR = H`` and the map back, ``dewhiten(D_L) = R⁺ D_L``; ``dropped`` clamped directions."""

    R: torch.Tensor
    R_pinv: torch.Tensor
    dropped: int

    def dewhiten(self, D_L: torch.Tensor) -> torch.Tensor:
        return self.R_pinv @ D_L


def whitening(H: torch.Tensor, damping: float = 1e-6) -> Whitening:
    """From ``H = Q Λ Qᵀ`` (eigh in float64, relative ``damping``, tiny eigenvalues clamped): ``R = Λ^{1/2} Qᵀ`` and
    ``R⁺ = Q Λ^{-1/2}``. Any root gives the same objective; dictionary learning is equivariant to the rotation."""
    root = gram_sqrt(H, damping=damping)
    return Whitening(R=root.S.T.contiguous(), R_pinv=root.S_pinv.T.contiguous(), dropped=root.dropped)


def batch_omp(G: torch.Tensor, A0: torch.Tensor, s: int, chunk: int = 8192, per_step: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit of every signal at once, from Grams only (Batch-OMP, Rubinstein et al. 2008).

    ``G = DᵀD`` (k × k, unit-norm atoms) and ``A0 = DᵀX`` (k × m, one column per signal). Each step picks, per signal,
    the unused atom most correlated with its residual and extends the inverse Cholesky factor ``L⁻¹`` of ``G_II`` by
    one row (two batched mat-vecs, no triangular solve); the coefficients ``γ = L⁻ᵀ z`` gain one rank-one term and the
    residual correlations ``α = A0 − G_{:,I} γ`` come from one dense product. Work per signal is O(s·k² + s³)
    multiply-adds, all as batched GEMMs over the columns (chunks of ``chunk``, smaller when ``L⁻¹`` would not fit).

    ``per_step > 1`` picks that many atoms per step (generalised OMP, Wang et al. 2012: the top correlations, one
    block Cholesky extension): ``per_step`` times fewer steps, a slightly different support. ``per_step = 1`` is
    OMP exactly. Returns ``(index, coef)``, both m × s, atoms in the order chosen: exactly ``s`` atoms per signal (one
    already in the span of the chosen ones keeps the coefficient 0).
    """
    k, m = A0.shape
    s = min(s, k)
    dt, dev = A0.dtype, A0.device
    index = torch.empty(m, s, dtype=torch.long, device=dev)
    coef = torch.empty(m, s, dtype=dt, device=dev)
    diag = G.diagonal()
    eps = torch.finfo(dt).eps * 64
    chunk = max(16, min(chunk, 2 ** 25 // max(s * s, 1)))
    for c0 in range(0, m, chunk):
        a0 = A0[:, c0:c0 + chunk].T.contiguous()  # B × k
        B = a0.shape[0]
        alpha, taken = a0.clone(), torch.zeros(B, k, dtype=torch.bool, device=dev)
        idx = torch.empty(B, s, dtype=torch.long, device=dev)
        Li = torch.zeros(B, s, s, dtype=dt, device=dev)  # L⁻¹, lower triangular
        z = torch.zeros(B, s, dtype=dt, device=dev)
        gamma = torch.zeros(B, s, dtype=dt, device=dev)
        j = 0
        while j < s:
            b = min(per_step, s - j)
            pick = alpha.abs().masked_fill_(taken, -1.0).topk(b, dim=1).indices  # B × b
            idx[:, j:j + b] = pick
            taken.scatter_(1, pick, True)
            Lj = Li[:, :j, :j]
            g = G[idx[:, :j].unsqueeze(2), pick.unsqueeze(1)]  # B × j × b: new atoms against the chosen ones
            W = Lj @ g  # L⁻¹ g, B × j × b (bmm runs at memory bandwidth here; the O(s³) part of OMP)
            schur = G[pick.unsqueeze(2), pick.unsqueeze(1)] - W.transpose(1, 2) @ W  # B × b × b
            if b == 1:  # OMP: a scalar pivot; an atom in the span of the chosen ones gets a structural zero
                d = schur.view(B)
                ok = d > eps * diag[pick[:, 0]].clamp_min(eps)
                inv = torch.where(ok, d.clamp_min(eps).rsqrt(), torch.zeros_like(d)).view(B, 1, 1)
            else:
                jitter = eps * schur.diagonal(dim1=1, dim2=2).mean(1).clamp_min(eps)
                eye = torch.eye(b, dtype=dt, device=dev)
                Ln, info = torch.linalg.cholesky_ex(schur + jitter.view(B, 1, 1) * eye)
                inv = torch.linalg.solve_triangular(Ln, eye.expand(B, b, b), upper=False)
                # a new atom (nearly) in the span of the chosen ones and those picked before it in this step: the
                # factorisation failed (info > 0) or its pivot is the jitter alone, and L⁻¹ would blow up
                own = diag[pick].clamp_min(eps)  # B × b: the new atoms' squared norms
                bad = (info > 0) | (Ln.diagonal(dim1=1, dim2=2).square() <= eps * own + jitter.view(B, 1)).any(1)
                if bad.any():
                    inv[bad] = _inverse_factor(schur[bad], own[bad], eps)
            rows = -inv @ (W.transpose(1, 2) @ Lj)  # B × b × j: the new rows of L⁻¹
            Li[:, j:j + b, :j] = rows
            Li[:, j:j + b, j:j + b] = inv
            zn = (inv @ (a0.gather(1, pick) - (W.transpose(1, 2) @ z[:, :j].unsqueeze(2)).squeeze(2)
                         ).unsqueeze(2)).squeeze(2)  # B × b
            z[:, j:j + b] = zn
            gamma[:, :j] += (rows.transpose(1, 2) @ zn.unsqueeze(2)).squeeze(2)
            gamma[:, j:j + b] = (inv.transpose(1, 2) @ zn.unsqueeze(2)).squeeze(2)
            j += b
            if j < s:
                full = torch.zeros(B, k, dtype=dt, device=dev).scatter_(1, idx[:, :j], gamma[:, :j])
                alpha = torch.addmm(a0, full, G, alpha=-1.0)
        index[c0:c0 + B] = idx
        coef[c0:c0 + B] = gamma
    return index, coef


def _inverse_factor(S: torch.Tensor, own: torch.Tensor, eps: float) -> torch.Tensor:
    """``L⁻¹`` of the Schur complements ``S`` (B × b × b) of a generalised-OMP step, one atom at a time as OMP extends
    its factor: an atom whose pivot is below ``eps`` times its squared norm ``own`` (B × b), i.e. in the span of the
    atoms chosen before it, gets a zero row (a structural zero coefficient) instead of a blown-up one."""
    B, b, _ = S.shape
    M = torch.zeros_like(S)
    for c in range(b):
        w = (M[:, :c, :c] @ S[:, :c, c:c + 1]).squeeze(2)  # B × c
        d = S[:, c, c] - (w * w).sum(1)
        ok = d > eps * own[:, c]
        r = torch.where(ok, d.clamp_min(eps).rsqrt(), torch.zeros_like(d))  # B
        M[:, c, :c] = -r.unsqueeze(1) * (w.unsqueeze(1) @ M[:, :c, :c]).squeeze(1)
        M[:, c, c] = r
    return M


def omp_reference(D: torch.Tensor, x: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain OMP of one signal ``x`` (n) on ``D`` (n × k) by least squares at each step (for tests)."""
    chosen: list[int] = []
    r, sol = x.clone(), x.new_zeros(0)
    for _ in range(s):
        corr = (D.T @ r).abs()
        if chosen:
            corr[chosen] = -1
        chosen.append(int(corr.argmax()))
        sol = torch.linalg.lstsq(D[:, chosen], x.unsqueeze(1)).solution.squeeze(1)
        r = x - D[:, chosen] @ sol
    return torch.tensor(chosen), sol


def codes_matrix(index: torch.Tensor, coef: torch.Tensor, k: int) -> torch.Tensor:
    """The dense k × m coefficient matrix (paper layout) of per-signal ``(index, coef)``."""
    out = torch.zeros(index.shape[0], k, dtype=coef.dtype, device=coef.device)
    return out.scatter_(1, index, coef).T


def ksvd_update(WL: torch.Tensor, D: torch.Tensor, index: torch.Tensor, coef: torch.Tensor, power_iters: int = 8,
                reinit_unused: bool = False, atoms: int | None = None) -> tuple[int, torch.Tensor]:
    """K-SVD's atom update, in place (Aharon et al. 2006; CoSpaDi Alg. 1 with power iteration, §A.3).

    Atom by atom: with ``J`` the signals using atom ``i`` (supports fixed), ``R = E_J + d_i c_{i,J}`` is the residual
    without the atom; ``(d_i, c_{i,J})`` becomes its best rank-1 approximation (``power_iters`` steps from the current
    atom), and the residual ``E`` is updated. Unused atoms are left, or (``reinit_unused``) replaced by the worst
    represented signal's residual direction. ``atoms`` limits the update to the first ones (timing a sample).
    Returns (unused atoms, the residual ``E = WL − D C``, n × m)."""
    k = D.shape[1]
    Et = WL.T - codes_matrix(index, coef, k).T @ D.T  # m × n: one signal's residual per row (row gathers are cheap)
    flat = index.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=k).tolist()
    signal = order // index.shape[1]
    cflat = coef.view(-1)
    unused, start = 0, 0
    for i in range(k if atoms is None else min(atoms, k)):
        n_i = counts[i]
        if n_i == 0:
            unused += 1
            if reinit_unused:
                col = Et[int((Et * Et).sum(1).argmax())]
                D[:, i] = col / col.norm().clamp_min(torch.finfo(Et.dtype).tiny)
            continue
        J, P = signal[start:start + n_i], order[start:start + n_i]
        start += n_i
        d = D[:, i]
        Rt = torch.addr(Et[J], cflat[P], d)  # |J| × n
        u = d
        for _ in range(power_iters):
            u = Rt.T @ (Rt @ u)
            nrm = u.norm()
            if nrm == 0:
                break
            u = u / nrm
        v = Rt @ u
        D[:, i] = u
        cflat[P] = v
        Et[J] = torch.addr(Rt, v, u, alpha=-1.0)
    return unused, Et.T


@dataclass
class DictFit:
    """A learned dictionary (whitened, n × k), the per-signal supports/values (m × s) and what it cost."""

    D: torch.Tensor
    index: torch.Tensor
    coef: torch.Tensor
    errors: list[float] = field(default_factory=list)  # ‖W_L − D C‖/‖W_L‖ after each round
    seconds: dict[str, float] = field(default_factory=lambda: {"omp": 0.0, "update": 0.0})
    iterations: int = 0
    unused_atoms: int = 0


def init_dictionary(WL: torch.Tensor, k: int, how: str = "columns", seed: int = 42) -> torch.Tensor:
    """``k`` unit-norm atoms: random distinct columns of ``WL`` (the paper), or its top left singular vectors
    (``svd``); random Gaussian atoms fill in where there are too few (k beyond the columns or the rank)."""
    n, m = WL.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if how == "svd":
        U = torch.linalg.svd(WL.double(), full_matrices=False)[0].to(WL.dtype)
        D = U[:, :k]
    else:
        D = WL[:, torch.randperm(m, generator=gen)[:k].to(WL.device)]
    if D.shape[1] < k:
        D = torch.cat([D, torch.randn(n, k - D.shape[1], generator=gen, dtype=WL.dtype).to(WL.device)], 1)
    norms = D.norm(dim=0)
    dead = norms <= torch.finfo(WL.dtype).tiny
    if dead.any():
        D[:, dead] = torch.randn(n, int(dead.sum()), generator=gen, dtype=WL.dtype).to(WL.device)
        norms = D.norm(dim=0)
    return D / norms


def learn_dictionary(WL: torch.Tensor, k: int, s: int, iters: int = 60, power_iters: int = 8, init: str = "columns",
                     seed: int = 42, tol: float = 0.0, reinit_unused: bool = False, chunk: int = 8192,
                     per_step: int = 1, on_round=None) -> DictFit:
    """Alg. 1 on the whitened weight ``WL`` (n × m, one column per output neuron): ``iters`` rounds of Batch-OMP then
    K-SVD, stopping early once a round improves the relative error by less than ``tol``. The best round is kept
    (OMP is greedy, so a round can be worse than the one before). ``on_round(t, error)`` is called after each."""
    fit = DictFit(D=init_dictionary(WL, k, init, seed), index=None, coef=None)  # type: ignore[arg-type]
    norm = float(WL.norm()) or 1.0
    best = math.inf
    D = fit.D
    for t in range(iters):
        t0 = time.perf_counter()
        index, coef = batch_omp(D.T @ D, D.T @ WL, s, chunk, per_step)
        t1 = time.perf_counter()
        fit.unused_atoms, E = ksvd_update(WL, D, index, coef, power_iters, reinit_unused)
        t2 = time.perf_counter()
        fit.seconds["omp"] += t1 - t0
        fit.seconds["update"] += t2 - t1
        err = float(E.norm()) / norm
        fit.errors.append(err)
        fit.iterations = t + 1
        if err < best:
            prev, best = best, err
            fit.D, fit.index, fit.coef = D.clone(), index, coef
        else:
            prev = best
        if on_round is not None:
            on_round(t, err)
        if tol > 0 and math.isfinite(prev) and (prev - err) / max(prev, 1e-30) < tol:
            break
    order = fit.index.argsort(1)  # ascending atom index per signal: the checkpoint's order
    fit.index, fit.coef = fit.index.gather(1, order), fit.coef.gather(1, order)
    return fit
