"""CoSpaDi's math (methods/cospadi/math.py) against closed forms and brute force: the identities of methods.md §6."""
import pytest
import torch

from compress.methods.cospadi import math as DL
from compress.linalg import whitened_spectrum


def _problem(n=24, m=40, tokens=200, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, n, dtype=torch.float64)
    if rank is not None:  # rank-deficient calibration: the Gram has n − rank zero eigenvalues
        X = X[:, :rank] @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    return W, X, X.T @ X


def test_size_formula_reproduces_the_papers_examples():
    # Qwen3-8B 4096 x 12288 at 20% removed: Eq. 11 (no mask) and Eq. 10 (1-bit mask, 16-bit values)
    assert DL.dict_size(12288, 4096, 0.8, mask_bits=0) == (3932, 1966)
    assert DL.dict_size(12288, 4096, 0.8) == (3657, 1828)
    k, s = DL.dict_size(12288, 4096, 0.8)
    bits = DL.dict_storage_bits(12288, 4096, k, s)
    assert bits <= 0.8 * 16 * 12288 * 4096 < DL.dict_storage_bits(12288, 4096, k + 2, (k + 2) // 2)
    # a shared dictionary stores n·k once for L layers: more atoms at the same kept fraction
    assert DL.dict_size(12288, 4096, 0.8, layers=4)[0] > 3657


def test_whitened_error_equals_data_error():
    W, X, H = _problem()
    wh = DL.whitening(H, damping=0.0)
    assert torch.allclose(wh.R.T @ wh.R, H, rtol=1e-9, atol=1e-8)
    W2 = W + 0.1 * torch.randn_like(W)
    data = torch.linalg.norm(X @ (W - W2).T)
    white = torch.linalg.norm(wh.R @ (W - W2).T)
    assert torch.allclose(data, white, rtol=1e-10)
    # de-whitening solves R D = D_L on the range of a rank-deficient Gram, without an inverse of H
    W, X, H = _problem(rank=10)
    wh = DL.whitening(H, damping=0.0)
    assert wh.dropped == 14
    D_L = wh.R @ torch.randn(24, 5, dtype=torch.float64)
    assert torch.allclose(wh.R @ wh.dewhiten(D_L), D_L, atol=1e-8)


def _atoms_and_signals(n, k, m, seed):
    """Unit-norm random atoms (n × k), random signals (n × m) and the generator for more."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n, k, generator=g, dtype=torch.float64)
    return D / D.norm(dim=0), torch.randn(n, m, generator=g, dtype=torch.float64), g


def test_batch_omp_equals_plain_omp_and_recovers_planted_supports():
    n, k, m, s = 48, 64, 60, 5
    D, X, g = _atoms_and_signals(n, k, m, seed=1)
    index, coef = DL.batch_omp(D.T @ D, D.T @ X, s, chunk=16)  # several chunks
    for j in range(m):
        ref_index, ref_coef = DL.omp_reference(D, X[:, j], s)
        assert torch.equal(index[j], ref_index)
        assert torch.allclose(coef[j], ref_coef, atol=1e-9)
    # planted: X = D* S* with s atoms per column; OMP finds exactly those supports and values
    support = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(m)])
    values = (torch.rand(m, s, generator=g, dtype=torch.float64) + 0.5) * torch.sign(torch.randn(m, s, generator=g))
    Xp = DL.codes_matrix(support, values, k)
    Xp = D @ Xp
    index, coef = DL.batch_omp(D.T @ D, D.T @ Xp, s)
    for j in range(m):
        assert set(index[j].tolist()) == set(support[j].tolist())
    assert torch.allclose(D @ DL.codes_matrix(index, coef, k), Xp, atol=1e-9)


def test_generalised_omp_gives_least_squares_coefficients_on_its_support():
    n, k, m, s = 30, 40, 25, 9
    D, X, _ = _atoms_and_signals(n, k, m, seed=2)
    index, coef = DL.batch_omp(D.T @ D, D.T @ X, s, per_step=4)  # steps of 4, 4, 1
    assert index.shape == (m, s) and all(len(set(r.tolist())) == s for r in index)
    for j in range(m):
        ls = torch.linalg.lstsq(D[:, index[j]], X[:, j:j + 1]).solution.squeeze(1)
        assert torch.allclose(coef[j], ls, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_step", [2, 4])
def test_generalised_omp_with_atoms_in_the_span_stays_least_squares(per_step, dtype):
    """Issue 22 (10a), confirmed: a dictionary of rank 4 in 8 dimensions (every atom in the span of 4 others, one
    duplicate) makes the block Cholesky of a generalised-OMP step fail (``cholesky_ex``'s ``info``) or pivot on the
    jitter alone; its ``L⁻¹`` blew up (coefficients ~1e19, errors ~1e4 × the signal). Such an atom now gets a
    structural zero, as in OMP with one atom per step: finite coefficients, the best error on the support."""
    n, k, m, s = 8, 24, 300, 6
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for seed in range(16):  # before the fix, float64 blew up at seeds 2, 7, 10..., float32 at 8, 13... (per_step 2)
        g = torch.Generator().manual_seed(seed)
        D = torch.randn(n, 4, generator=g, dtype=torch.float64) @ torch.randn(4, k, generator=g, dtype=torch.float64)
        D[:, 1] = D[:, 0]
        D = D / D.norm(dim=0)
        X = torch.randn(n, m, generator=g, dtype=torch.float64)
        best = (X - D @ torch.linalg.pinv(D) @ X).norm(dim=0)  # the span of all atoms: 4 of them reach it
        D, X = D.to(dtype), X.to(dtype)
        index, coef = DL.batch_omp(D.T @ D, D.T @ X, s, per_step=per_step)
        assert all(len(set(r.tolist())) == s for r in index)
        assert torch.isfinite(coef).all() and coef.abs().max() < 100, (seed, float(coef.abs().max()))
        err = (X - D @ DL.codes_matrix(index, coef, k)).double().norm(dim=0)
        assert (err - best).max() <= tol * X.double().norm(dim=0).max(), seed


def test_generalised_omp_on_a_well_conditioned_dictionary_never_takes_the_span_fallback(monkeypatch):
    """The fallback of a failed block factorisation runs only where one fails: well-conditioned problems keep the
    block Cholesky's results bit for bit."""
    def forbidden(*args):
        raise AssertionError("span fallback on a well-conditioned dictionary")

    monkeypatch.setattr(DL, "_inverse_factor", forbidden)
    n, k, m, s = 30, 40, 25, 9
    D, X, _ = _atoms_and_signals(n, k, m, seed=2)
    for per_step in (2, 4, 9):
        DL.batch_omp(D.T @ D, D.T @ X, s, per_step=per_step)
        DL.batch_omp((D.T @ D).float(), (D.T @ X).float(), s, per_step=per_step)
    W, _, H = _problem(n=32, m=64)
    WL = DL.whitening(H).R @ W.T
    DL.learn_dictionary(WL.float(), 16, 8, iters=4, per_step=4)


def test_ksvd_update_returns_the_residual_and_never_increases_it():
    g = torch.Generator().manual_seed(3)
    WL = torch.randn(20, 50, generator=g, dtype=torch.float64)
    D = DL.init_dictionary(WL, 16)
    index, coef = DL.batch_omp(D.T @ D, D.T @ WL, 6)
    before = torch.linalg.norm(WL - D @ DL.codes_matrix(index, coef, 16))
    _, E = DL.ksvd_update(WL, D, index, coef, power_iters=20)
    assert torch.allclose(E, WL - D @ DL.codes_matrix(index, coef, 16), atol=1e-10)
    assert torch.linalg.norm(E) <= before + 1e-12
    assert torch.allclose(D.norm(dim=0), torch.ones(16, dtype=torch.float64))


def test_k_equals_s_is_no_better_than_the_svd_llm_optimum_and_reaches_it_from_svd_atoms():
    """k = s: every output uses every atom, so W̃ has rank ≤ k and SVD-LLM's whitened truncation is optimal."""
    W, X, H = _problem()
    k = 7
    optimum = whitened_spectrum(W, H).relative_error(k)
    wh = DL.whitening(H, damping=0.0)
    WL = wh.R @ W.T
    for init in ("columns", "svd"):
        fit = DL.learn_dictionary(WL, k, k, iters=5, init=init)
        W_tilde = (wh.dewhiten(fit.D) @ DL.codes_matrix(fit.index, fit.coef, k)).T
        err = float(torch.linalg.norm(X @ (W - W_tilde).T) / torch.linalg.norm(X @ W.T))
        assert err >= optimum - 1e-9
        if init == "svd":
            assert err == pytest.approx(optimum, rel=1e-6)


def test_error_falls_with_atoms_and_rounds_and_every_output_has_s_atoms():
    W, X, H = _problem(n=32, m=64)
    WL = DL.whitening(H).R @ W.T
    errs = []
    for k in (8, 16, 24):
        fit = DL.learn_dictionary(WL, k, k // 2, iters=6)
        assert fit.index.shape == (64, k // 2)
        assert all(len(set(r.tolist())) == k // 2 for r in fit.index)  # exactly s distinct atoms per output
        assert torch.equal(fit.index, fit.index.sort(1).values)  # stored in ascending atom order
        errs.append(min(fit.errors))
    assert errs[0] > errs[1] > errs[2]
    fit = DL.learn_dictionary(WL, 16, 8, iters=8)
    assert fit.errors[-1] < fit.errors[0]  # the rounds improve on the first
    stopped = DL.learn_dictionary(WL, 16, 8, iters=60, tol=0.05)
    assert stopped.iterations < 60  # early stop on relative improvement


def test_float32_learning_tracks_float64():
    """Every round's error in float32 within 1 % of float64's: the rounds' discrete atom choices may part ways where
    two candidates are within rounding of each other (0.3 % apart after four rounds on one CPU, 0.1 % on another), a
    broken float32 path would not stay this close."""
    W, X, H = _problem(n=32, m=64)
    WL = DL.whitening(H).R @ W.T
    e64 = DL.learn_dictionary(WL, 16, 8, iters=4).errors
    e32 = DL.learn_dictionary(WL.float(), 16, 8, iters=4).errors
    assert len(e32) == len(e64) == 4
    assert e32 == pytest.approx(e64, rel=1e-2)
