"""The math, on random matrices: exact reconstruction, monotone error, whitened optimum vs brute force."""
import pytest
import torch

from compress.linalg import (gram_sqrt, rank_for_energy, rank_for_ratio, saves_parameters, weighted_error,
                             weighted_svd, whitened_spectrum, dense_target, dense_objective_error)
from compress.methods import get_method


def _data(m=12, n=10, N=40, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, N, generator=g, dtype=torch.float64)
    X = X * torch.logspace(0, 2, n, dtype=torch.float64)[:, None]  # anisotropic inputs: whitening matters
    if rank is not None:
        X = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, N, generator=g,
                                                                                dtype=torch.float64)
    return W, X


def _lowrank(method, W, X, r, **options):
    m = get_method(method)
    A, B = m(m.config_cls(**options)).spectrum(W, {"input_gram": X @ X.T}).factors(r)
    return A @ B


def test_rank_formula_per_matrix():
    assert rank_for_ratio(4096, 4096, 0.8) == 1638
    assert rank_for_ratio(4096, 11008, 0.8) == 2388
    assert rank_for_ratio(1024, 4096, 1.0) == 819  # GQA k/v break-even, never hidden*ρ/2
    assert rank_for_ratio(1024, 4096, 0.5, align=8) % 8 == 0
    assert not saves_parameters(1024, 4096, 819 + 1) and saves_parameters(1024, 4096, 818)


SHAPES = [(12, 10), (6, 10), (10, 10)]  # out > in, out < in, square: both exact routes of the whitened solver


@pytest.mark.parametrize("m,n", SHAPES)
def test_full_rank_reconstructs_exactly(m, n):
    W, X = _data(m, n)
    for method in ("svd", "svd-llm"):
        assert torch.allclose(_lowrank(method, W, X, min(m, n)), W, atol=1e-9)


@pytest.mark.parametrize("m,n", SHAPES)
def test_inverse_free_route_equals_paper_formula(m, n):
    """U_r U_rᵀ W equals SVD-LLM's U_r Σ_r V_rᵀ S⁻¹ computed literally (SVD of W·S with S from gram_sqrt)."""
    W, X = _data(m, n)
    H = X @ X.T
    root = gram_sqrt(H, damping=0.0)
    A0, B0 = weighted_svd(W, right=root.S, right_pinv=root.S_pinv).factors(4)
    assert torch.allclose(_lowrank("svd-llm", W, X, 4), A0 @ B0, atol=1e-8)
    spec = whitened_spectrum(W, H)
    A, B = spec.factors(4)
    assert abs(spec.relative_error(4) - weighted_error(W, A @ B, H)) < 1e-10


def test_error_falls_with_rank():
    W, X = _data()
    H = X @ X.T
    for method in ("svd", "svd-llm"):
        errs = [weighted_error(W, _lowrank(method, W, X, r), H if method == "svd-llm" else None) for r in
                range(1, 11)]
        assert all(a > b for a, b in zip(errs, errs[1:])), errs


def _brute_force_optimum(W, X, r):
    """min ||(W - W')X||_F over rank-r W' in closed form via the thin QR of Xᵀ (independent of any whitening):
    W' = (W X)_r X⁺ where (WX)_r is the Eckart–Young truncation of W X restricted to the row space of X."""
    WX = W @ X
    U, s, Vh = torch.linalg.svd(WX, full_matrices=False)
    best = (U[:, :r] * s[:r]) @ Vh[:r]
    return float(torch.linalg.norm(WX - best))


@pytest.mark.parametrize("m,n", SHAPES)
def test_whitened_svd_reaches_the_optimum_and_beats_plain_svd(m, n):
    W, X = _data(m, n)
    for r in (2, min(m, n) - 1):
        opt = _brute_force_optimum(W, X, r)
        svdllm = float(torch.linalg.norm((W - _lowrank("svd-llm", W, X, r)) @ X))
        plain = float(torch.linalg.norm((W - _lowrank("svd", W, X, r)) @ X))
        assert abs(svdllm - opt) <= 1e-6 * opt
        assert svdllm < plain


def test_whitened_optimum_against_random_search():
    """No random rank-r matrix near the solution does better (a brute-force local check)."""
    W, X = _data(m=6, n=5, N=30)
    r = 2
    best = float(torch.linalg.norm((W - _lowrank("svd-llm", W, X, r)) @ X))
    g = torch.Generator().manual_seed(1)
    A, B = get_method("svd-llm")().spectrum(W, {"input_gram": X @ X.T}).factors(r)
    for _ in range(200):
        Ap = A + 1e-3 * torch.randn(A.shape, generator=g, dtype=A.dtype)
        Bp = B + 1e-3 * torch.randn(B.shape, generator=g, dtype=B.dtype)
        assert float(torch.linalg.norm((W - Ap @ Bp) @ X)) >= best - 1e-9


def test_truncation_loss_equals_dropped_singular_values():
    W, X = _data()
    m = get_method("svd-llm")
    spec = m(m.config_cls(damping=0.0)).spectrum(W, {"input_gram": X @ X.T})
    A, B = spec.factors(4)
    err2 = float(torch.linalg.norm((W - A @ B) @ X) ** 2)
    assert abs(err2 - spec.truncation_loss(4)) <= 1e-8 * err2


@pytest.mark.parametrize("m,n", SHAPES)
def test_rank_deficient_and_tiny_calibration_give_finite_factors(m, n):
    for N in (8, 3):  # 8 tokens, and fewer tokens than input features: the Gram is singular
        W, X = _data(m, n, N=N)
        for r in (1, 4, min(m, n) - 1):
            W2 = _lowrank("svd-llm", W, X, r)
            assert torch.isfinite(W2).all()
            # on the data it has seen, the result is optimal up to the damping (1e-6 of the mean eigenvalue)
            scale = float(torch.linalg.norm(W @ X))
            assert float(torch.linalg.norm((W - W2) @ X)) <= _brute_force_optimum(W, X, r) + 1e-4 * scale
    W, X = _data(rank=3)
    root = gram_sqrt(X @ X.T, damping=0.0)
    assert root.dropped >= 6 and torch.isfinite(root.S_pinv).all()
    assert torch.isfinite(_lowrank("svd-llm", W, X, 5)).all()
    zero = gram_sqrt(torch.zeros(4, 4, dtype=torch.float64))
    assert torch.isfinite(zero.S).all() and torch.isfinite(zero.S_pinv).all()


def test_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.7) == 2
    assert rank_for_energy(s, 1.0) == 3
    spec = weighted_svd(torch.eye(3, dtype=torch.float64))
    assert spec.sigma.shape == (3,)


def _drifted(m=8, n=10, N=60, seed=3):
    """Dense inputs X and compressed-path inputs X̃ = X + drift, on the same tokens."""
    W, X = _data(m, n, N, seed)
    g = torch.Generator().manual_seed(seed + 1)
    Xc = X + 0.3 * X.std() * torch.randn(X.shape, generator=g, dtype=torch.float64)
    return W, X, Xc


@pytest.mark.parametrize("m,n", SHAPES)
def test_dense_objective_reaches_brute_force_optimum(m, n):
    """With damping 0, whitening the least-squares target on X̃ minimises ||W X − W' X̃|| over rank-r W'."""
    W, X, Xc = _drifted(m, n)
    Hc, C, Hd = Xc @ Xc.T, X @ Xc.T, X @ X.T
    Wt = dense_target(W, Hc, C, damping=0.0)
    Y = W @ X
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)  # orthonormal basis of X̃'s row space
    YV = Y @ Vh.T
    s = torch.linalg.svdvals(YV)
    for r in (1, 3, min(m, n) - 1):
        A, B = whitened_spectrum(Wt, Hc).factors(r)
        ours = float(torch.linalg.norm(Y - A @ B @ Xc))
        best = float((torch.linalg.norm(Y) ** 2 - torch.linalg.norm(YV) ** 2 + (s[r:] ** 2).sum()).sqrt())
        assert abs(ours - best) <= 1e-6 * best
        # and it beats the layer objective (whitening W itself on X̃) on this criterion
        A2, B2 = whitened_spectrum(W, Hc).factors(r)
        assert ours < float(torch.linalg.norm(Y - A2 @ B2 @ Xc))
        rel = dense_objective_error(W, A @ B, Hd, C, Hc)
        assert abs(rel - ours / float(torch.linalg.norm(Y))) < 1e-9


def test_dense_target_shrinks_to_w():
    W, X, Xc = _drifted()
    assert torch.allclose(dense_target(W, Xc @ Xc.T, X @ Xc.T, damping=1e9), W, atol=1e-6)
    W_ls = dense_target(W, Xc @ Xc.T, X @ Xc.T, damping=0.0)
    assert torch.allclose(W_ls, torch.linalg.lstsq(Xc.T, (W @ X).T).solution.T, atol=1e-8)
