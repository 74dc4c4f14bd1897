"""ASVD, FWSVD, LoRD on random matrices: each reaches its own weighted optimum, full rank is exact, options matter."""
import pytest
import torch

from compress.linalg import weighted_svd
from compress.methods import get_method
from test_linalg import _data


def _method(name, **options):
    cls = get_method(name)
    return cls(cls.config_cls(**options))


def _stats(W, X):
    g = torch.Generator().manual_seed(1)
    return {"input_gram": X @ X.T, "input_abs_mean": X.abs().mean(1), "input_abs_max": X.abs().amax(1),
            "fisher_in": torch.rand(W.shape[1], generator=g, dtype=torch.float64) * 10,
            "fisher_out": torch.rand(W.shape[0], generator=g, dtype=torch.float64) * 10}


def _weights(name, W, stats, **options):
    """The (left, right) diagonal scalings whose Frobenius error each method minimises."""
    if name == "asvd":
        s = stats["input_abs_max" if options.get("scaling") == "abs_max" else "input_abs_mean"] ** 0.5 + 1e-6
        return None, torch.diag(s)
    if options.get("axis") == "output":
        return torch.diag(stats["fisher_out"].sqrt()), None
    return None, torch.diag(stats["fisher_in"].sqrt())


def _err(W, Wp, L, R):
    D = W - Wp
    D = L @ D if L is not None else D
    D = D @ R if R is not None else D
    return float(torch.linalg.norm(D))


CASES = [("asvd", {}), ("asvd", {"scaling": "abs_max"}), ("fwsvd", {}), ("fwsvd", {"axis": "output"})]


@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize("m,n", [(12, 10), (6, 10)])
def test_scaled_svd_methods_reach_their_weighted_optimum(name, options, m, n):
    W, X = _data(m, n)
    stats = _stats(W, X)
    spec = _method(name, **options).spectrum(W, stats)
    L, R = _weights(name, W, stats, **options)
    A, B = spec.factors(min(m, n))
    assert torch.allclose(A @ B, W, atol=1e-9)  # full rank is exact
    r = 3
    A, B = spec.factors(r)
    best = _err(W, A @ B, L, R)
    assert best == pytest.approx(float(spec.sigma[r:].square().sum().sqrt()), rel=1e-9)  # closed form
    g = torch.Generator().manual_seed(2)
    for _ in range(200):  # no random rank-r perturbation of the optimum does better
        Ap = A + 0.05 * torch.randn(A.shape, generator=g, dtype=torch.float64)
        Bp = B + 0.05 * torch.randn(B.shape, generator=g, dtype=torch.float64)
        assert _err(W, Ap @ Bp, L, R) >= best - 1e-12


def test_orientations_and_scalings_differ():
    W, X = _data(12, 10)
    stats = _stats(W, X)
    prod = {}
    for name, options in CASES:
        A, B = _method(name, **options).spectrum(W, stats).factors(3)
        prod[(name, str(options))] = A @ B
    values = list(prod.values())
    assert all(not torch.allclose(values[i], values[j], atol=1e-6)
               for i in range(len(values)) for j in range(i + 1, len(values)))


@pytest.mark.parametrize("m,n", [(12, 10), (6, 10)])
def test_lord_data_is_output_pca_and_reaches_the_activation_optimum(m, n):
    W, X = _data(m, n)
    spec = _method("lord").spectrum(W, {"input_gram": X @ X.T})
    A, B = spec.factors(3)
    assert torch.allclose(A.T @ A, torch.eye(3, dtype=torch.float64), atol=1e-9)  # A = P_r orthonormal
    Y = W @ X
    P = torch.linalg.svd(Y, full_matrices=False)[0][:, :3]  # principal output directions, computed directly
    assert torch.allclose(A @ A.T, P @ P.T, atol=1e-8) and torch.allclose(B, A.T @ W, atol=1e-9)
    svdllm = _method("svd-llm").spectrum(W, {"input_gram": X @ X.T}).factors(3)
    assert torch.allclose(A @ B, svdllm[0] @ svdllm[1], atol=1e-8)  # the same optimum of ||(W - W')X||
    full = spec.factors(min(m, n))
    assert torch.allclose(full[0] @ full[1], W, atol=1e-9)


def test_lord_weights_is_truncated_svd():
    W, _ = _data(12, 10)
    A, B = _method("lord", variant="weights").spectrum(W, {}).factors(4)
    ref = weighted_svd(W).factors(4)
    assert torch.allclose(A @ B, ref[0] @ ref[1], atol=1e-9)
