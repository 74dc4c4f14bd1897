"""MoDeGPT's closed forms (Lin et al., "MoDeGPT: Modular Decomposition for Large Language Model Compression",
ICLR 2025, arXiv 2408.09632; ../shared/methods.md §5): pure tensor math, no modules, no statistics passes.

Every module keeps plain dense Linears of smaller shapes (no extra matrices):

- Type I (Alg. 1, MLP, the Nyström approximation of Sec. 3.2): keep k intermediate neurons by ridge leverage scores
  of the down_proj input Gram, refit down_proj by Nyström (= least squares of the dense MLP output on the kept
  neurons): ``ridge_leverage``, ``nystrom_keep``, ``nystrom_down``.
- Type II (Alg. 2, query/key, the CR decomposition): keep the same k head dims of Q and K by the CR score, closed
  under the RoPE pairs of HF ``rotate_half`` and shared by a GQA group: ``qk_pair_scores``, ``qk_pair_index``,
  ``select_qk``.
- Type III (Alg. 3, value/output, the SVD): rank-k approximation of ``W_O W_V`` in the input-weighted norm, jointly
  for all query heads of a KV group: ``vo_grouped``.
- ``kept_dims``: ``k = ⌈(1 − φ)·d⌉`` kept dims of a unit (q/k: whole RoPE pairs).

The global sparsity allocation of Sec. 3.4 (block influence) is not MoDeGPT's alone: ``allocation/influence.py``.

Conventions: torch weights are (out x in), ``y = W x``; Grams are sums over tokens (``C = Σ_t x_t x_tᵀ``); heads
are laid out head-major (channel ``j*d + i``); query head j belongs to KV group ``j // G``, ``G = H // H_kv``.
Math is in float64; no inverse of a Gram is ever formed (eigh with clamping, or a jittered Cholesky solve).
"""
from __future__ import annotations

import math

import torch

_F64 = torch.float64


def _sym(C: torch.Tensor) -> torch.Tensor:
    C = C.to(_F64)
    return 0.5 * (C + C.T)


def _top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest ``scores`` (ties: lower index first, deterministic), sorted ascending."""
    order = torch.sort(-scores, stable=True).indices[:k]
    return torch.sort(order).values


# ----------------------------------------------------------------------------------------------- Type I: MLP
def ridge_leverage(C: torch.Tensor, alpha: float) -> tuple[torch.Tensor, float]:
    """Ridge leverage scores ``ℓ_i = [C (C + λI)⁻¹]_ii = 1 − λ [(C + λI)⁻¹]_ii`` (MoDeGPT Alg. 1).

    ``C`` (d x d) is the PSD Gram of down_proj's input, ``λ = alpha · tr(C) / d`` so ``alpha`` is scale-free (sum vs
    mean Gram). With ``C = U diag(e) Uᵀ`` (eigh, negative round-off clamped to 0), ``ℓ_i = Σ_k U_ik² e_k / (e_k + λ)``:
    no inverse is formed. ``alpha → 0`` on a full-rank C gives ``ℓ ≈ 1`` (all tied); ``alpha → ∞`` gives
    ``ℓ_i ≈ C_ii / λ``, i.e. ranks by ``C_ii``. Returns (scores (d,) float64, λ).
    """
    if not alpha > 0:
        raise ValueError(f"ridge_leverage: alpha must be > 0, got {alpha}")
    C = _sym(C)
    d = C.shape[0]
    lam = float(alpha * C.diagonal().sum().clamp_min(0) / d)
    e, U = torch.linalg.eigh(C)
    e = e.clamp_min(0)
    denom = e + lam
    w = torch.where(denom > 0, e / denom.clamp_min(torch.finfo(_F64).tiny), torch.zeros_like(e))
    return (U * U) @ w, lam


def nystrom_keep(C: torch.Tensor, k: int, alpha: float, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (LongTensor (k,), ascending) of the k neurons with the largest ridge leverage scores of ``C``
    (``scores``: already computed by ``ridge_leverage(C, alpha)``, to spare a second eigendecomposition)."""
    d = C.shape[0]
    if not 1 <= k <= d:
        raise ValueError(f"nystrom_keep: need 1 <= k <= {d}, got k={k}")
    if scores is None:
        scores, _ = ridge_leverage(C, alpha)
    return _top_sorted(scores, k)


def nystrom_down(W_down: torch.Tensor, C: torch.Tensor, keep: torch.Tensor, jitter: float = 1e-10) -> torch.Tensor:
    """New down_proj weight ``W_down · C[:, S] · C[S, S]⁺`` (h x k), MoDeGPT Type I (Alg. 1, Nyström).

    With ``C = Σ_t z_t z_tᵀ`` this is the least-squares fit ``argmin_B Σ_t ||W_down z_t − B z_{t,S}||²`` of the dense
    MLP output from the kept neurons. Solved as ``(C_SS + μI) Bᵀ = C[S, :] W_downᵀ`` with ``μ = jitter ·
    mean(diag C_SS)`` by Cholesky (float64), falling back to a pseudo-inverse if that fails. Keeping every neuron
    returns ``W_down`` (columns in ``keep`` order) exactly, also for a rank-deficient ``C``.
    """
    W = W_down.to(_F64)
    C = _sym(C.to(W.device))
    keep = torch.as_tensor(keep, dtype=torch.long, device=W.device)
    d = C.shape[0]
    if W.shape[1] != d:
        raise ValueError(f"nystrom_down: W_down has {W.shape[1]} inputs but C is {d} x {d}")
    if keep.numel() == d and torch.unique(keep).numel() == d:
        return W[:, keep].clone()
    Css = C[keep][:, keep]
    rhs = C[keep] @ W.T  # (k, h)
    mu = jitter * float(Css.diagonal().mean().clamp_min(0))
    A = Css + mu * torch.eye(Css.shape[0], dtype=_F64, device=W.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        Bt = torch.cholesky_solve(rhs, L)
    else:
        Bt = torch.linalg.pinv(A, hermitian=True) @ rhs
    return Bt.T.contiguous()


# ----------------------------------------------------------------------------------------- Type II: query/key
def qk_pair_scores(cq: torch.Tensor, ck: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """CR scores of the RoPE pairs ``(p, p + d/2)`` per KV group, (H_kv, d/2) float64 (MoDeGPT Alg. 2, extended).

    ``cq`` (H, d) / ``ck`` (H_kv, d) are the diagonals of ``C_Q,j = Σ_t q_j q_jᵀ`` / ``C_K,g``. The CR score of dim i
    is ``‖C_Q^{1/2}[:, i]‖ · ‖C_K^{1/2}[:, i]‖ = √(C_Q,ii C_K,ii)`` (column norms of the symmetric root). Here it is
    taken per RoPE pair and per GQA group: ``s_p = √(Σ_{j∈g}(cq[j,p] + cq[j,p']) · (ck[g,p] + ck[g,p']))``,
    ``p' = p + d/2``. The rotation acts on each pair as a 2-D rotation, so a pair's energy (its two diagonal entries
    summed) is the same before and after RoPE: pre-RoPE statistics give the same scores as post-RoPE ones.
    """
    cq, ck = cq.to(_F64), ck.to(_F64)
    H, d = cq.shape
    if H != num_heads or ck.shape != (num_kv_heads, d) or num_heads % num_kv_heads or d % 2:
        raise ValueError(f"qk_pair_scores: cq {tuple(cq.shape)} / ck {tuple(ck.shape)} do not fit "
                         f"{num_heads} heads, {num_kv_heads} KV heads and an even head_dim")
    G, half = num_heads // num_kv_heads, d // 2
    q = cq.reshape(num_kv_heads, G, d).sum(1)
    q_pair, k_pair = q[:, :half] + q[:, half:], ck[:, :half] + ck[:, half:]
    return (q_pair.clamp_min(0) * k_pair.clamp_min(0)).sqrt()


def qk_pair_index(cq: torch.Tensor, ck: torch.Tensor, k: int, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Kept q/k head dims per KV group, LongTensor (H_kv, k): ``[p_1..p_m, p_1+d/2..p_m+d/2]``, m = k/2.

    The top m pairs by ``qk_pair_scores`` (ties: lower p first), ``p_1 < … < p_m``. Why pairs: HF ``rotate_half``
    pairs dim i with i + d/2, so a selection commutes with RoPE only if it is closed under pairs; laid out as above,
    ``rotate_half`` on the compressed k-dim vectors pairs position a with a + m, i.e. ``p_a`` with ``p_a + d/2``, and
    with cos/sin gathered at the index it gives exactly the selected dims of the full RoPE output (exact logits).
    The same index serves K of group g and all of its query heads (one KV cache per group).
    """
    d = cq.shape[-1]
    if k % 2 or not 2 <= k <= d:
        raise ValueError(f"qk_pair_index: k must be even with 2 <= k <= {d}, got k={k}")
    scores = qk_pair_scores(cq, ck, num_heads, num_kv_heads)
    rows = [_top_sorted(s, k // 2) for s in scores]
    pairs = torch.stack(rows).to(cq.device)
    return torch.cat([pairs, pairs + d // 2], dim=1)


def _head_rows(index: torch.Tensor, heads: int, d: int, group: int) -> torch.Tensor:
    """Flat row indices ``j*d + index[j // group]`` for heads j = 0..heads-1."""
    j = torch.arange(heads, device=index.device)
    return (j[:, None] * d + index[j // group]).reshape(-1)


def select_qk(Wq: torch.Tensor, bq: torch.Tensor | None, Wk: torch.Tensor, bk: torch.Tensor | None,
              index: torch.Tensor, num_heads: int, num_kv_heads: int):
    """Row selection of q_proj/k_proj at ``index`` (H_kv, k): query head j keeps rows ``j*d + index[j // G]``, KV
    head g rows ``g*d + index[g]``; biases likewise (None stays None). Exact (Type II keeps columns of the paper's
    ``W_Q``/``W_K``); dtype kept. Returns ``(Wq' (H*k x h), bq', Wk' (H_kv*k x h), bk')``.
    """
    d = Wq.shape[0] // num_heads
    if Wq.shape[0] != num_heads * d or Wk.shape[0] != num_kv_heads * d or index.shape[0] != num_kv_heads:
        raise ValueError(f"select_qk: Wq {tuple(Wq.shape)}, Wk {tuple(Wk.shape)}, index {tuple(index.shape)} do not "
                         f"fit {num_heads} heads / {num_kv_heads} KV heads")
    index = index.to(device=Wq.device, dtype=torch.long)
    rq = _head_rows(index, num_heads, d, num_heads // num_kv_heads)
    rk = _head_rows(index, num_kv_heads, d, 1)
    return (Wq[rq], None if bq is None else bq[rq], Wk[rk], None if bk is None else bk[rk])


# -------------------------------------------------------------------------------------- Type III: value/output
def vo_grouped(C: torch.Tensor, Wv: torch.Tensor, bv: torch.Tensor | None, Wo: torch.Tensor, k: int,
               num_heads: int, num_kv_heads: int, rtol: float | None = None) -> dict:
    """MoDeGPT Type III (Alg. 3) for a GQA group: rank-k ``M' V'`` of ``M_g W_v,g`` in the C-weighted norm.

    For KV group g, ``W_v,g`` (d x h) are its v rows and ``M_g`` (G·h x d) stacks ``Wo[:, j-block]`` of its query
    heads. ``min ||(M_g W_v,g − M' V') X||_F`` with ``V'`` (k x h) shared by the group: with ``C = X Xᵀ = S S``
    (symmetric root, eigh, eigenvalues below ``rtol · λ_max`` — default: negatives only — set to 0), ``S W_v,gᵀ = QR``
    and ``M_g Rᵀ = U Σ Pᵀ``, ``M_g W_v,g S = U Σ (Q P)ᵀ`` is an SVD, so the optimum is ``M' = U_k``,
    ``V' = U_kᵀ M_g W_v,g`` with squared error ``Σ_{i>k} σ_i²`` (Eckart-Young), no inverse of C needed. For G = 1 this
    is the truncated SVD of ``C^{1/2} W_V W_O`` of the paper's two-SVD form. A v bias folds exactly into an o bias
    (softmax rows sum to 1): ``bo_add = Σ_j Wo_j b_v,g(j)``; the new v has no bias. ``k >= d`` returns the original
    weights (k clamped to d).

    Returns a dict: ``Wv`` (H_kv·k x h), ``Wo`` (h x H·k), ``bo_add`` (h,), ``dropped``/``total`` (H_kv,) squared
    weighted errors / energies, ``rel_error`` (float), ``k`` (the kept dim), ``sigma`` (H_kv, d), all float64.
    """
    C, Wv, Wo = _sym(C), Wv.to(_F64), Wo.to(_F64)
    h = C.shape[0]
    H, Hkv = num_heads, num_kv_heads
    d = Wv.shape[0] // Hkv
    if H % Hkv or Wv.shape != (Hkv * d, h) or Wo.shape != (h, H * d):
        raise ValueError(f"vo_grouped: Wv {tuple(Wv.shape)}, Wo {tuple(Wo.shape)}, C {tuple(C.shape)} do not fit "
                         f"{H} heads / {Hkv} KV heads")
    if k < 1:
        raise ValueError(f"vo_grouped: k must be >= 1, got {k}")
    G, k = H // Hkv, min(k, d)
    e, Qc = torch.linalg.eigh(C)
    floor = 0.0 if rtol is None else rtol * float(e.max().clamp_min(0))
    S = (Qc * torch.where(e > floor, e, torch.zeros_like(e)).sqrt()) @ Qc.T
    Wv_out, Wo_out, dropped, total, sigmas = [], [], [], [], []
    for g in range(Hkv):
        Wv_g = Wv[g * d:(g + 1) * d]  # (d, h)
        M = Wo[:, g * G * d:(g + 1) * G * d].reshape(h, G, d).transpose(0, 1).reshape(G * h, d)
        _, R = torch.linalg.qr(S @ Wv_g.T)  # (d, d)
        U, sig, _ = torch.linalg.svd(M @ R.T, full_matrices=False)
        sig = torch.cat([sig, sig.new_zeros(d - sig.numel())])
        sigmas.append(sig)
        total.append((sig ** 2).sum())
        dropped.append((sig[k:] ** 2).sum())
        if k == d:
            Vp, Mp = Wv_g, M
        else:
            Mp = U[:, :k]
            Mp = torch.cat([Mp, Mp.new_zeros(G * h, k - Mp.shape[1])], dim=1)
            Vp = Mp.T @ (M @ Wv_g)
        Wv_out.append(Vp)
        Wo_out.extend(Mp[i * h:(i + 1) * h] for i in range(G))
    bo_add = torch.zeros(h, dtype=_F64, device=Wo.device)
    if bv is not None:
        bvf = bv.to(_F64).reshape(Hkv, d)
        bo_add = Wo @ bvf.repeat_interleave(G, dim=0).reshape(-1)
    dropped_t, total_t = torch.stack(dropped), torch.stack(total)
    tot = float(total_t.sum())
    return {"Wv": torch.cat(Wv_out, 0), "Wo": torch.cat(Wo_out, 1), "bo_add": bo_add,
            "dropped": dropped_t, "total": total_t, "sigma": torch.stack(sigmas), "k": k,
            "rel_error": math.sqrt(float(dropped_t.sum()) / tot) if tot > 0 else 0.0}


# ------------------------------------------------------------------------------------------------ kept dims
def kept_dims(d: int, kept_fraction: float, multiple: int = 1) -> int:
    """Kept size of a dim of ``d``: ``⌈kept_fraction · d⌉`` rounded up to a multiple of ``multiple``, clamped to
    ``[multiple, largest multiple <= d]`` (k_m, k_vo: multiple 1; k_qk: multiple 2, RoPE pairs).

    MoDeGPT keeps ``k = ⌈(1 − φ)·d⌉`` dims (methods.md §5, types I and II), ``kept_fraction = 1 − φ`` (the stage's
    ``param_ratio``, or ``1 − φ_l`` from block influence); q/k keep whole RoPE pairs, ``m = ⌈(1 − φ)·d / 2⌉``, so
    never fewer than ``⌈(1 − φ)·d⌉`` dims. The product is rounded to 9 decimals first, so float round-off
    (``0.7 · 10 = 7.000000000000001``) does not add a dim."""
    if multiple < 1 or d < multiple or not 0 <= kept_fraction <= 1:
        raise ValueError(f"kept_dims: need multiple >= 1, d >= multiple, 0 <= kept_fraction <= 1; got d={d}, "
                         f"kept_fraction={kept_fraction}, multiple={multiple}")
    k = multiple * math.ceil(round(kept_fraction * d / multiple, 9))
    return int(min(max(k, multiple), (d // multiple) * multiple))
