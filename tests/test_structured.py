"""MoDeGPT's tensor math (compress/methods/modegpt/math.py) on small random matrices: each identity against a direct or
brute-force computation (ridge leverage, Nyström = least squares, CR/RoPE pair scores, exact RoPE logits under a
pair-closed mask, the grouped V-O SVD vs SVD of the weighted product and the paper's two-SVD form, bias folding,
the clipped softmax allocation)."""
import math

import pytest
import torch

from compress.allocation.influence import block_influence_phi, cosine_influence
from compress.methods.modegpt.math import (kept_dims, nystrom_down, nystrom_keep, qk_pair_index, qk_pair_scores,
                                           ridge_leverage, select_qk, vo_grouped)

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, g):
    return torch.randn(*shape, generator=g, dtype=F64)


def _gram(d, N, g, decay=2.0):
    """C = Zᵀ Z (sum over N tokens) with anisotropic columns, and Z (N x d)."""
    Z = _rand(N, d, g=g) * torch.logspace(0, decay, d, dtype=F64)[torch.randperm(d, generator=g)]
    return Z.T @ Z, Z


def _sym_root(C):
    e, Q = torch.linalg.eigh(C)
    return (Q * e.clamp_min(0).sqrt()) @ Q.T


# ------------------------------------------------------------------------------------------------- Type I
def test_ridge_leverage_identity_and_limits():
    g = _gen(0)
    C, _ = _gram(12, 50, g)
    scores, lam = ridge_leverage(C, 0.05)
    assert lam == pytest.approx(0.05 * float(C.trace()) / 12)
    direct = torch.diagonal(C @ torch.linalg.inv(C + lam * torch.eye(12, dtype=F64)))
    torch.testing.assert_close(scores, direct, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scores, 1 - lam * torch.diagonal(torch.linalg.inv(C + lam * torch.eye(12, dtype=F64))),
                               rtol=1e-9, atol=1e-12)
    assert scores.min() < 0.9 and scores.max() > 0.1  # a spread, so the identity check is not trivial
    tiny, _ = ridge_leverage(C, 1e-12)
    torch.testing.assert_close(tiny, torch.ones(12, dtype=F64), rtol=0, atol=1e-6)
    huge, _ = ridge_leverage(C, 1e8)
    assert torch.equal(torch.argsort(huge, descending=True), torch.argsort(C.diagonal(), descending=True))
    with pytest.raises(ValueError):
        ridge_leverage(C, 0.0)


def test_nystrom_keep_top_k_sorted_with_deterministic_ties():
    g = _gen(1)
    C, _ = _gram(10, 40, g)
    keep = nystrom_keep(C, 4, 0.1)
    scores, _ = ridge_leverage(C, 0.1)
    assert keep.dtype == torch.long and torch.equal(keep, torch.sort(keep).values)
    assert set(keep.tolist()) == set(torch.topk(scores, 4).indices.tolist())
    assert torch.equal(nystrom_keep(torch.eye(6, dtype=F64), 3, 0.1), torch.tensor([0, 1, 2]))  # all tied
    with pytest.raises(ValueError):
        nystrom_keep(C, 11, 0.1)


def test_nystrom_down_is_least_squares_fit():
    g = _gen(2)
    N, d_int, h = 80, 16, 6
    Z = _rand(N, d_int, g=g) @ _rand(d_int, d_int, g=g)  # correlated neurons: the refit has something to use
    C, W_down = Z.T @ Z, _rand(h, d_int, g=g)
    keep = nystrom_keep(C, 7, 0.01)
    B = nystrom_down(W_down, C, keep)
    assert B.shape == (h, 7) and B.dtype == F64
    Bt_ls = torch.linalg.lstsq(Z[:, keep], Z @ W_down.T).solution
    torch.testing.assert_close(B, Bt_ls.T, rtol=1e-6, atol=1e-8)
    # it is better than simply dropping columns of W_down
    err = lambda M: float((Z @ W_down.T - Z[:, keep] @ M.T).norm())  # noqa: E731
    assert err(B) < 0.9 * err(W_down[:, keep])
    torch.testing.assert_close(nystrom_down(W_down, C, torch.arange(d_int)), W_down, rtol=0, atol=0)


def test_nystrom_down_singular_kept_block_falls_back():
    g = _gen(3)
    Z = _rand(30, 3, g=g) @ _rand(3, 8, g=g)  # rank 3 < kept 5
    C, W = Z.T @ Z, _rand(4, 8, g=g)
    keep = torch.tensor([0, 2, 3, 5, 7])
    B = nystrom_down(W, C, keep, jitter=0.0)
    assert torch.isfinite(B).all()
    torch.testing.assert_close(Z[:, keep] @ B.T, Z @ W.T, rtol=1e-6, atol=1e-6)  # still a perfect fit


# ------------------------------------------------------------------------------------------------ Type II
def test_cr_score_is_product_of_root_column_norms():
    g = _gen(4)
    d = 8
    Q, K = _rand(40, d, g=g) @ _rand(d, d, g=g), _rand(40, d, g=g) @ _rand(d, d, g=g)
    CQ, CK = Q.T @ Q, K.T @ K
    SQ, SK = _sym_root(CQ), _sym_root(CK)
    per_dim = (CQ.diagonal() * CK.diagonal()).sqrt()
    torch.testing.assert_close(per_dim, SQ.norm(dim=0) * SK.norm(dim=0), rtol=1e-10, atol=0)
    pair = qk_pair_scores(CQ.diagonal()[None], CK.diagonal()[None], 1, 1)[0]
    nq, nk = SQ.norm(dim=0) ** 2, SK.norm(dim=0) ** 2
    torch.testing.assert_close(pair, ((nq[:4] + nq[4:]) * (nk[:4] + nk[4:])).sqrt(), rtol=1e-10, atol=0)


def _rope(T, d, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=F64) / d)
    freqs = torch.outer(torch.arange(T, dtype=F64) * 3.7, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([-x2, x1], dim=-1)


def _apply(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def test_rope_pair_closed_mask_gives_exact_logits():
    g = _gen(5)
    T, d = 9, 8
    q, k = _rand(T, d, g=g), _rand(T, d, g=g)
    cos, sin = _rope(T, d)
    full = lambda idx: _apply(q, cos, sin)[:, idx] @ _apply(k, cos, sin)[:, idx].T  # noqa: E731
    comp = lambda idx: (_apply(q[:, idx], cos[:, idx], sin[:, idx])  # noqa: E731
                        @ _apply(k[:, idx], cos[:, idx], sin[:, idx]).T)
    closed = torch.tensor([1, 3, 1 + d // 2, 3 + d // 2])
    torch.testing.assert_close(comp(closed), full(closed), rtol=1e-12, atol=1e-12)
    broken = torch.tensor([1, 3, 1 + d // 2, 2 + d // 2])  # 3's partner dropped
    assert (comp(broken) - full(broken)).abs().max() > 1e-3
    # pair energies are RoPE-invariant: same pair scores and index from pre- and post-RoPE diagonals
    pre_q, pre_k = (q ** 2).sum(0)[None], (k ** 2).sum(0)[None]
    post_q, post_k = (_apply(q, cos, sin) ** 2).sum(0)[None], (_apply(k, cos, sin) ** 2).sum(0)[None]
    assert (pre_q - post_q).abs().max() > 1e-3  # the single diagonals do change
    torch.testing.assert_close(qk_pair_scores(pre_q, pre_k, 1, 1), qk_pair_scores(post_q, post_k, 1, 1),
                               rtol=1e-12, atol=0)
    assert torch.equal(qk_pair_index(pre_q, pre_k, 4, 1, 1), qk_pair_index(post_q, post_k, 4, 1, 1))


def test_qk_pair_index_gqa_shapes_and_energetic_pairs():
    H, Hkv, d, k = 6, 2, 8, 4
    cq = torch.ones(H, d, dtype=F64)
    ck = torch.ones(Hkv, d, dtype=F64)
    cq[0:3, 1] += 50.0   # group 0: pair 1 (dims 1, 5) via the queries ...
    ck[0, 6] += 40.0     # ... and pair 2 (dims 2, 6) via the key
    cq[4, 7] += 30.0     # group 1: pair 3 via one query head only
    ck[1, 0] += 30.0     # and pair 0 via the key
    idx = qk_pair_index(cq, ck, k, H, Hkv)
    assert idx.shape == (Hkv, k) and idx.dtype == torch.long
    assert idx.tolist() == [[1, 2, 5, 6], [0, 3, 4, 7]]
    g = _gen(6)
    cq, ck = _rand(H, d, g=g).abs(), _rand(Hkv, d, g=g).abs()
    for kk in (2, 4, 6, 8):
        idx = qk_pair_index(cq, ck, kk, H, Hkv)
        for row in idx.tolist():
            p, partner = row[: kk // 2], row[kk // 2:]
            assert p == sorted(set(p)) and partner == [i + d // 2 for i in p] and max(p) < d // 2
    for bad in (0, 3, 10):
        with pytest.raises(ValueError):
            qk_pair_index(cq, ck, bad, H, Hkv)


def test_select_qk_uses_group_index():
    g = _gen(7)
    H, Hkv, d, h, k = 4, 2, 6, 5, 4
    Wq, Wk = _rand(H * d, h, g=g).float(), _rand(Hkv * d, h, g=g).float()
    bq, bk = _rand(H * d, g=g).float(), _rand(Hkv * d, g=g).float()
    index = torch.tensor([[0, 2, 3, 5], [1, 2, 4, 5]])
    Wq2, bq2, Wk2, bk2 = select_qk(Wq, bq, Wk, bk, index, H, Hkv)
    assert Wq2.shape == (H * k, h) and Wk2.shape == (Hkv * k, h) and Wq2.dtype == torch.float32
    for j in range(H):
        assert torch.equal(Wq2[j * k:(j + 1) * k], Wq[j * d:(j + 1) * d][index[j // 2]])
        assert torch.equal(bq2[j * k:(j + 1) * k], bq[j * d:(j + 1) * d][index[j // 2]])
    for gg in range(Hkv):
        assert torch.equal(Wk2[gg * k:(gg + 1) * k], Wk[gg * d:(gg + 1) * d][index[gg]])
        assert torch.equal(bk2[gg * k:(gg + 1) * k], bk[gg * d:(gg + 1) * d][index[gg]])
    assert select_qk(Wq, None, Wk, None, index, H, Hkv)[1] is None
    # per-head logits of the selected projections equal the masked full ones
    x = _rand(3, h, g=g).float()
    q, kk = x @ Wq.T, x @ Wk.T
    q2, k2 = x @ Wq2.T, x @ Wk2.T
    for j in range(H):
        ref = q[:, j * d:(j + 1) * d][:, index[j // 2]] @ kk[:, (j // 2) * d:(j // 2 + 1) * d][:, index[j // 2]].T
        torch.testing.assert_close(q2[:, j * k:(j + 1) * k] @ k2[:, (j // 2) * k:(j // 2 + 1) * k].T, ref)


# ----------------------------------------------------------------------------------------------- Type III
def _vo_setup(seed, H, Hkv, d, h, N=60):
    g = _gen(seed)
    X = _rand(h, N, g=g) * torch.logspace(0, 1.5, h, dtype=F64)[:, None]
    return X, _rand(Hkv * d, h, g=g), _rand(Hkv * d, g=g), _rand(h, H * d, g=g)


def _products(Wv, Wo, H, Hkv, k):
    """Per query head j: the (h x h) map Wo_j Wv_{g(j)}."""
    G = H // Hkv
    return [Wo[:, j * k:(j + 1) * k] @ Wv[(j // G) * k:(j // G + 1) * k] for j in range(H)]


@pytest.mark.parametrize("H,Hkv", [(3, 3), (4, 2), (4, 1)])
def test_vo_error_equals_weighted_residual(H, Hkv):
    d, h, k = 6, 10, 3
    X, Wv, bv, Wo = _vo_setup(8, H, Hkv, d, h)
    C = X @ X.T
    out = vo_grouped(C, Wv, bv, Wo, k, H, Hkv)
    assert out["Wv"].shape == (Hkv * k, h) and out["Wo"].shape == (h, H * k) and out["k"] == k
    dense, comp = _products(Wv, Wo, H, Hkv, d), _products(out["Wv"], out["Wo"], H, Hkv, k)
    resid = [float(((P - Pc) @ X).norm() ** 2) for P, Pc in zip(dense, comp)]
    G = H // Hkv
    per_group = torch.tensor([sum(resid[g * G:(g + 1) * G]) for g in range(Hkv)], dtype=F64)
    torch.testing.assert_close(out["dropped"], per_group, rtol=1e-8, atol=1e-8)
    energy = torch.tensor([sum(float((P @ X).norm() ** 2) for P in dense[g * G:(g + 1) * G]) for g in range(Hkv)],
                          dtype=F64)
    torch.testing.assert_close(out["total"], energy.to(F64), rtol=1e-8, atol=0)
    assert out["rel_error"] == pytest.approx(math.sqrt(sum(resid) / float(energy.sum())), rel=1e-8)
    assert 0 < out["rel_error"] < 1


def test_vo_mha_matches_brute_force_and_paper_two_svd():
    H = Hkv = 2
    d, h, k = 5, 8, 2
    X, Wv, _, Wo = _vo_setup(9, H, Hkv, d, h)
    C = X @ X.T
    S = _sym_root(C)
    out = vo_grouped(C, Wv, None, Wo, k, H, Hkv)
    comp = _products(out["Wv"], out["Wo"], H, Hkv, k)
    for j in range(H):
        Wv_j, Wo_j = Wv[j * d:(j + 1) * d], Wo[:, j * d:(j + 1) * d]
        U, s, Vh = torch.linalg.svd(Wo_j @ Wv_j @ S)
        best = (U[:, :k] * s[:k]) @ Vh[:k] @ torch.linalg.inv(S)  # brute-force optimum (S invertible here)
        torch.testing.assert_close(comp[j], best, rtol=1e-7, atol=1e-8)
        assert float(out["dropped"][j]) == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-9)
        # paper (rows convention): SVD(C^{1/2} W_V) = U Σ Vᵀ, SVD(Σ Vᵀ W_O) = U' Σ' V'ᵀ,
        # W_V <- C^{-1/2} U U'_k, W_O <- Σ'_k V'_kᵀ
        Up, sp, Vph = torch.linalg.svd(S @ Wv_j.T, full_matrices=False)
        U2, s2, V2h = torch.linalg.svd(sp[:, None] * Vph @ Wo_j.T, full_matrices=False)
        paper = torch.linalg.inv(S) @ Up @ U2[:, :k] @ (s2[:k, None] * V2h[:k])  # (h x h), = (Wo_j Wv_j)'ᵀ
        paper_err = float((S @ (Wv_j.T @ Wo_j.T - paper)).norm() ** 2)
        assert paper_err == pytest.approx(float(out["dropped"][j]), rel=1e-7)


def test_vo_gqa_joint_beats_v_alone():
    H, Hkv, d, h, k = 4, 1, 6, 8, 3
    X, Wv, _, Wo = _vo_setup(10, H, Hkv, d, h)
    C = X @ X.T
    out = vo_grouped(C, Wv, None, Wo, k, H, Hkv)
    M = torch.cat([Wo[:, j * d:(j + 1) * d] for j in range(H)], 0)
    # V alone: rank-k whitened approximation of Wv (min ||(Wv − Wv') X||), Wo kept: M P_k P_kᵀ Wv
    U, _, _ = torch.linalg.svd(Wv @ X, full_matrices=False)
    v_only = float(((M @ Wv - M @ U[:, :k] @ U[:, :k].T @ Wv) @ X).norm() ** 2)
    joint = float(out["dropped"].sum())
    assert joint <= v_only * (1 + 1e-10)
    assert joint < 0.95 * v_only  # strictly better on this generic example


def test_vo_full_rank_and_rank_deficient_gram_exact():
    H, Hkv, d, h = 4, 2, 4, 6
    X, Wv, _, Wo = _vo_setup(11, H, Hkv, d, h, N=3)  # C has rank 3 < h: no inverse may be needed
    C = X @ X.T
    for k in (d, d + 3):
        out = vo_grouped(C, Wv, None, Wo, k, H, Hkv)
        assert out["k"] == d and out["Wv"].shape == (Hkv * d, h)
        for P, Pc in zip(_products(Wv, Wo, H, Hkv, d), _products(out["Wv"], out["Wo"], H, Hkv, d)):
            torch.testing.assert_close(Pc, P, rtol=1e-12, atol=1e-12)
        assert float(out["dropped"].sum()) == pytest.approx(0.0, abs=1e-9 * float(out["total"].sum()))
    out = vo_grouped(C, Wv, None, Wo, 2, H, Hkv)
    assert torch.isfinite(out["Wv"]).all() and torch.isfinite(out["Wo"]).all()
    resid = sum(float(((P - Pc) @ X).norm() ** 2) for P, Pc in
                zip(_products(Wv, Wo, H, Hkv, d), _products(out["Wv"], out["Wo"], H, Hkv, 2)))
    assert resid == pytest.approx(float(out["dropped"].sum()), rel=1e-7, abs=1e-9)


def _attention_out(x, Wv, bv, Wo, A, H, Hkv, k):
    """Σ_j A_j (x Wv_gᵀ + bv_g) Wo_jᵀ for row-stochastic A_j (T x T)."""
    G = H // Hkv
    v = x @ Wv.T + (0 if bv is None else bv)
    return sum(A[j] @ v[:, (j // G) * k:(j // G + 1) * k] @ Wo[:, j * k:(j + 1) * k].T for j in range(H))


@pytest.mark.parametrize("k", [6, 3])
def test_vo_bias_folds_into_o_bias(k):
    H, Hkv, d, h, T = 4, 2, 6, 8, 5
    X, Wv, bv, Wo = _vo_setup(12, H, Hkv, d, h)
    g = _gen(13)
    A = torch.softmax(_rand(H, T, T, g=g) * 3, dim=-1)
    x = _rand(T, h, g=g)
    out = vo_grouped(X @ X.T, Wv, bv, Wo, k, H, Hkv)
    comp = _attention_out(x, out["Wv"], None, out["Wo"], A, H, Hkv, k) + out["bo_add"]
    # the bias part is exact at any k: compressed(with fold) − compressed(no bias) == dense(bv) − dense(no bias)
    bias_dense = _attention_out(x, Wv, bv, Wo, A, H, Hkv, d) - _attention_out(x, Wv, None, Wo, A, H, Hkv, d)
    torch.testing.assert_close(comp - _attention_out(x, out["Wv"], None, out["Wo"], A, H, Hkv, k), bias_dense)
    if k == d:
        torch.testing.assert_close(comp, _attention_out(x, Wv, bv, Wo, A, H, Hkv, d), rtol=1e-10, atol=1e-10)
    else:  # and the bias is not silently dropped (it matters in this example)
        assert bias_dense.abs().max() > 1e-2
    assert torch.equal(vo_grouped(X @ X.T, Wv, None, Wo, k, H, Hkv)["bo_add"], torch.zeros(h, dtype=F64))


# ------------------------------------------------------------------------------------------ allocation
def test_block_influence_phi_clips_and_keeps_mean():
    s = torch.tensor([0.01, 0.02, 0.05, 0.2, 0.3, 0.08, 0.03, 0.5])
    raw = len(s) * 0.4 * torch.softmax(-s.double() / 0.05, 0)
    assert raw.max() > 0.8  # the cap is active, more than one round may be needed
    phi = block_influence_phi(s, 0.4, 0.05, 0.8)
    assert phi.dtype == F64 and phi.shape == (8,)
    assert float(phi.mean()) == pytest.approx(0.4, abs=1e-14)
    assert float(phi.max()) <= 0.8 and int((phi == 0.8).sum()) >= 2
    order = torch.argsort(s, stable=True)
    assert all(phi[order[i]] >= phi[order[i + 1]] for i in range(7))  # smaller influence -> more sparsity
    free = phi < 0.8
    torch.testing.assert_close(phi[free] / phi[free].sum(), raw[free] / raw[free].sum())  # excess proportional
    no_cap = block_influence_phi(s, 0.1, 1.0, 0.95)
    torch.testing.assert_close(no_cap, len(s) * 0.1 * torch.softmax(-s.double(), 0))
    torch.testing.assert_close(block_influence_phi(s, 0.3, 1e6, 0.9), torch.full((8,), 0.3, dtype=F64))
    torch.testing.assert_close(block_influence_phi(s, 0.5, 1e-4, 0.5), torch.full((8,), 0.5, dtype=F64))
    tiny_eps = block_influence_phi(s, 0.3, 1e-5, 0.9)  # softmax underflows for most layers
    assert torch.isfinite(tiny_eps).all() and float(tiny_eps.mean()) == pytest.approx(0.3, abs=1e-14)
    with pytest.raises(ValueError):
        block_influence_phi(s, 0.6, 0.1, 0.5)
    with pytest.raises(ValueError):
        block_influence_phi(s, 0.3, 0.0, 0.9)


def test_cosine_influence():
    g = _gen(14)
    a = _rand(2, 5, 7, g=g)
    b = a * 3.0
    b[0, 0] = -a[0, 0]
    total, n = cosine_influence(a.float(), b.float())
    assert n == 10 and total == pytest.approx(8.0, abs=1e-5)
    c = _rand(2, 5, 7, g=g)
    total, _ = cosine_influence(a, c)
    ref = torch.nn.functional.cosine_similarity(a.reshape(-1, 7), c.reshape(-1, 7), dim=-1).sum()
    assert total == pytest.approx(float(ref), abs=1e-12)
    assert cosine_influence(torch.zeros(3, 4), torch.ones(3, 4)) == (0.0, 3)


def test_kept_dims():
    """k = ⌈(1 − φ)·d⌉ (methods.md §5), q/k in whole RoPE pairs (⌈(1 − φ)·d / 2⌉ pairs)."""
    assert kept_dims(100, 0.7) == 70
    assert kept_dims(10, 0.7) == 7 and kept_dims(10, 1 - 0.7) == 3  # float round-off (7.000000000000001) adds none
    assert kept_dims(10, 0.25) == 3  # 2.5 -> 3
    assert kept_dims(96, 0.7) == 68  # 67.2 -> 68 (half-up rounding would keep 67)
    assert kept_dims(100, 0.701) == 71  # 70.1 -> 71
    assert kept_dims(128, 0.7, 2) == 90  # 89.6 -> 90
    assert kept_dims(128, 0.695, 2) == 90  # 88.96 -> 89 -> whole pairs: 90
    assert kept_dims(128, 0.8, 2) == 104  # 102.4 -> 52 pairs (half-up rounding would keep 102)
    assert kept_dims(11008, 0.6) == 6605
    assert kept_dims(64, 0.0, 2) == 2 and kept_dims(64, 1.0, 2) == 64
    assert kept_dims(7, 1.0, 2) == 6  # never an odd/over-size result
    for bad in [(8, 1.5, 1), (8, 0.5, 0), (1, 0.5, 2)]:
        with pytest.raises(ValueError):
            kept_dims(*bad)
