"""EoRA's residual on random matrices: the optimum of ||(ΔW − BA)X|| among rank-r residuals, better than plain SVD
of ΔW on that objective, exact when r >= rank(ΔW), finite on a singular Gram."""
import pytest
import torch

from compress.compensation import eora_residual


def _case(m=12, n=10, N=40, seed=0, gram_rank=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    Wc = W + 0.3 * torch.randn(m, n, generator=g, dtype=torch.float64)  # any compression error
    X = torch.randn(n, N, generator=g, dtype=torch.float64) * torch.logspace(0, 2, n, dtype=torch.float64)[:, None]
    if gram_rank is not None:
        X = torch.randn(n, gram_rank, generator=g, dtype=torch.float64) @ torch.randn(gram_rank, N, generator=g,
                                                                                      dtype=torch.float64)
    return W - Wc, X


def _obj(delta, BA, X):
    return float(torch.linalg.norm((delta - BA) @ X))


@pytest.mark.parametrize("m,n", [(12, 10), (6, 10)])
def test_residual_is_the_optimum_and_beats_plain_svd(m, n):
    delta, X = _case(m, n)
    r = 3
    res = eora_residual(delta, X @ X.T, r)
    best = _obj(delta, res.B @ res.A, X)
    assert best == pytest.approx(float(res.sigma[r:].square().sum().sqrt()), rel=1e-8)
    Xi = torch.linalg.pinv(X)  # brute force: the rank-r truncation of ΔW X, mapped back, is optimal
    U, s, Vh = torch.linalg.svd(delta @ X, full_matrices=False)
    assert best == pytest.approx(_obj(delta, (U[:, :r] * s[:r]) @ Vh[:r] @ Xi, X), rel=1e-6)
    U, s, Vh = torch.linalg.svd(delta, full_matrices=False)  # plain SVD of ΔW ignores the inputs
    assert best < _obj(delta, (U[:, :r] * s[:r]) @ Vh[:r], X)
    g = torch.Generator().manual_seed(3)
    for _ in range(100):
        Bp = res.B + 0.02 * torch.randn(res.B.shape, generator=g, dtype=torch.float64)
        assert _obj(delta, Bp @ res.A, X) >= best - 1e-9


def test_full_rank_residual_removes_the_error():
    delta, X = _case(8, 10)
    res = eora_residual(delta, X @ X.T, 8)
    assert _obj(delta, res.B @ res.A, X) < 1e-8 * float(torch.linalg.norm(delta @ X))
    assert res.relative_error() < 1e-8 and res.dropped == 0


def test_singular_gram_is_handled_and_counted():
    delta, X = _case(12, 10, gram_rank=4)
    res = eora_residual(delta, X @ X.T, 6)
    assert torch.isfinite(res.A).all() and torch.isfinite(res.B).all()
    assert res.dropped == 6  # 10 input directions, calibration spans 4
    assert _obj(delta, res.B @ res.A, X) < 1e-8 * float(torch.linalg.norm(delta @ X))  # 4 directions suffice
    assert float(torch.linalg.norm(res.A @ torch.linalg.svd(X)[0][:, 4:])) < 1e-8  # unseen directions untouched
