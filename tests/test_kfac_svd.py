"""KFAC-SVD (LEMS paper, ICML 2026; methods.md §11) on random float64 matrices: the identities §11 lists for tests
(G = I is SVD-LLM, A = G = I plain SVD, full rank exact, truncation loss = dropped s², scale-free, diagonal G makes
both left factors agree) and that the default left factor minimises the KFAC objective where the paper's does not."""
import pytest
import torch
from pydantic import ValidationError

from compress.methods import METHODS
from compress.methods.kfac_svd import KFACSVD, KFACSVDConfig
from compress.methods.kfac_svd.math import kfac_objective, kfac_spectrum, lower_cholesky, shrink
from compress.methods.svd_llm import SVDLLM

SHAPES = [(12, 9), (9, 12)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _gram(k, tokens, seed):
    """``X Xᵀ`` of ``tokens`` random correlated k-vectors (rank min(k, tokens))."""
    g = _gen(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64)
    X = mix @ torch.randn(k, tokens, generator=g, dtype=torch.float64)
    return X @ X.T


def _case(m, n, seed=0, tokens=64):
    W = torch.randn(m, n, generator=_gen(seed + 100), dtype=torch.float64)
    return W, _gram(n, tokens, seed + 1), _gram(m, tokens, seed + 2)


def _wprime(spec, r):
    A, B = spec.factors(r)
    return A @ B


def _kfac(**options):
    return KFACSVD(KFACSVDConfig(**options))


def _ranks(m, n):
    return range(1, min(m, n) + 1)


@pytest.mark.parametrize("m, n", SHAPES)
@pytest.mark.parametrize("left", ["kfac", "reference"])
def test_identity_output_gram_is_svd_llm(m, n, left):
    W, A, _ = _case(m, n)
    spec = _kfac(alpha_a=0.0, left_factor=left).spectrum(W, {"input_gram": A, "output_grad_gram": torch.eye(m)})
    ref = SVDLLM().spectrum(W, {"input_gram": A})
    assert torch.allclose(spec.sigma, ref.sigma, rtol=1e-9, atol=1e-9)
    for r in _ranks(m, n):
        assert torch.allclose(_wprime(spec, r), _wprime(ref, r), rtol=1e-8, atol=1e-9), r
    assert spec.input_weighted is False  # the engine measures ||(W − W')X|| itself


@pytest.mark.parametrize("m, n", SHAPES)
def test_identity_grams_are_plain_svd(m, n):
    W, _, _ = _case(m, n)
    spec = _kfac().spectrum(W, {"input_gram": 5 * torch.eye(n), "output_grad_gram": 0.2 * torch.eye(m)})
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    assert torch.allclose(spec.sigma / spec.sigma[0], s / s[0], rtol=1e-10)
    for r in _ranks(m, n):
        assert torch.allclose(_wprime(spec, r), (U[:, :r] * s[:r]) @ Vh[:r], atol=1e-10), r


@pytest.mark.parametrize("m, n", SHAPES)
@pytest.mark.parametrize("left", ["kfac", "reference"])
def test_full_rank_is_exact(m, n, left):
    W, A, G = _case(m, n)
    spec = _kfac(left_factor=left).spectrum(W, {"input_gram": A, "output_grad_gram": G.float()})
    A_out, B_in = spec.factors(min(m, n))
    assert A_out.shape == (m, min(m, n)) and B_in.shape == (min(m, n), n)
    assert torch.allclose(A_out @ B_in, W, atol=1e-9)


@pytest.mark.parametrize("m, n", SHAPES)
@pytest.mark.parametrize("alpha_a, alpha_g", [(0.1, 0.3), (0.0, 0.3), (0.0, 0.0), (0.5, 0.0)])
def test_truncation_loss_is_the_kfac_objective(m, n, alpha_a, alpha_g):
    """``||L_Gᵀ (W − W') L_A||² = tr(ΔWᵀ G̃ ΔW Ã) = Σ_{i>r} s_i²`` at every rank, also for Grams of rank 4 < m, n
    (fewer tokens than features) left unshrunk: finite factors, the identity still holds."""
    W, A, G = _case(m, n, seed=3, tokens=4)
    At, Gt = shrink(A, alpha_a), shrink(G, alpha_g)
    spec = kfac_spectrum(W, A, G, alpha_a, alpha_g)
    scale = float((spec.sigma ** 2).sum())
    for r in _ranks(m, n):
        Wp = _wprime(spec, r)
        assert torch.isfinite(Wp).all()
        assert kfac_objective(W, Wp, At, Gt) == pytest.approx(spec.truncation_loss(r), abs=1e-9 * scale), r


@pytest.mark.parametrize("m, n", SHAPES)
def test_reference_truncation_loss_uses_the_cholesky_factor(m, n):
    """The paper's code: ``||L_G (W − W') L_A||² = Σ_{i>r} s_i²`` with ``L_G`` lower Cholesky (not transposed)."""
    W, A, G = _case(m, n, seed=5)
    spec = kfac_spectrum(W, A, G, left_factor="reference")
    L_G, At = lower_cholesky(shrink(G, 0.3)), shrink(A, 0.1)
    for r in _ranks(m, n):
        D = L_G @ (W - _wprime(spec, r))
        assert float(((D @ At) * D).sum()) == pytest.approx(spec.truncation_loss(r), rel=1e-8, abs=1e-10), r


@pytest.mark.parametrize("left", ["kfac", "reference"])
def test_scale_of_the_grams_does_not_matter(left):
    W, A, G = _case(12, 9, seed=7)
    base = kfac_spectrum(W, A, G, left_factor=left)
    scaled = kfac_spectrum(W, 1e3 * A, 1e-4 * G, left_factor=left)
    for r in _ranks(12, 9):
        assert torch.allclose(_wprime(base, r), _wprime(scaled, r), rtol=1e-8, atol=1e-10), r


@pytest.mark.parametrize("m, n", SHAPES)
def test_diagonal_output_gram_makes_both_left_factors_agree(m, n):
    W, A, _ = _case(m, n, seed=9)
    G = torch.diag(torch.rand(m, generator=_gen(4), dtype=torch.float64) * 10 + 0.1)
    kfac, ref = kfac_spectrum(W, A, G), kfac_spectrum(W, A, G, left_factor="reference")
    assert torch.allclose(kfac.sigma, ref.sigma, rtol=1e-9)
    for r in _ranks(m, n):
        assert torch.allclose(_wprime(kfac, r), _wprime(ref, r), rtol=1e-8, atol=1e-10), r


@pytest.mark.parametrize("m, n, seed", [(6, 5, 0), (12, 9, 1), (9, 12, 2)])
def test_kfac_factor_beats_the_reference_on_a_full_output_gram(m, n, seed):
    """methods.md §11's caution (a 6×5 example: 3.954 with L_Gᵀ, 3.992 with L_G at r = 2): on a non-diagonal G the
    default reaches a KFAC objective no larger than the paper's factor at every rank, strictly smaller at some."""
    W, A, G = _case(m, n, seed=seed, tokens=3 * m)
    At, Gt = shrink(A, 0.1), shrink(G, 0.3)
    kfac, ref = kfac_spectrum(W, A, G), kfac_spectrum(W, A, G, left_factor="reference")
    gaps = []
    for r in range(1, min(m, n)):
        e_kfac, e_ref = kfac_objective(W, _wprime(kfac, r), At, Gt), kfac_objective(W, _wprime(ref, r), At, Gt)
        assert e_kfac <= e_ref * (1 + 1e-10) + 1e-12, (r, e_kfac, e_ref)
        gaps.append((e_ref - e_kfac) / e_ref)
    assert max(gaps) > 1e-4, gaps


@pytest.mark.parametrize("m, n", SHAPES)
def test_kfac_is_optimal_among_rank_r_candidates(m, n):
    """At every rank the default's KFAC objective is no larger than SVD-LLM's W', plain SVD's W', and any small random
    perturbation of its own factors (a local brute-force check of the Eckart–Young argument)."""
    W, A, G = _case(m, n, seed=11)
    At, Gt = shrink(A, 0.1), shrink(G, 0.3)
    spec = kfac_spectrum(W, A, G)
    svd_llm = SVDLLM().spectrum(W, {"input_gram": A})
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    g = _gen(13)
    for r in range(1, min(m, n)):
        best = kfac_objective(W, _wprime(spec, r), At, Gt)
        assert best <= kfac_objective(W, _wprime(svd_llm, r), At, Gt) * (1 + 1e-10), r
        assert best <= kfac_objective(W, (U[:, :r] * s[:r]) @ Vh[:r], At, Gt) * (1 + 1e-10), r
        Ao, Bi = spec.factors(r)
        for _ in range(10):
            dA = 1e-3 * torch.randn(Ao.shape, generator=g, dtype=torch.float64)
            dB = 1e-3 * torch.randn(Bi.shape, generator=g, dtype=torch.float64)
            assert best <= kfac_objective(W, (Ao + dA) @ (Bi + dB), At, Gt) * (1 + 1e-12), r


def test_zero_output_gram_falls_back_to_input_whitening():
    """A Linear no gradient reached (G = 0) is weighted uniformly on the left: SVD-LLM on the shrunk A, not W' = 0."""
    W, A, _ = _case(12, 9, seed=15)
    spec = kfac_spectrum(W, A, torch.zeros(12, 12), alpha_a=0.0)
    ref = SVDLLM().spectrum(W, {"input_gram": A})
    assert torch.allclose(_wprime(spec, 3), _wprime(ref, 3), rtol=1e-8, atol=1e-9)


def test_method_shares_the_input_root_and_matches_the_math():
    W1, A, G1 = _case(12, 9, seed=17)
    W2, _, G2 = _case(7, 9, seed=19)
    method = _kfac(alpha_a=0.2, alpha_g=0.4)
    for W, G in ((W1, G1), (W2, G2)):
        spec = method.spectrum(W, {"input_gram": A, "output_grad_gram": G})
        want = kfac_spectrum(W, A, G, 0.2, 0.4)
        assert torch.allclose(_wprime(spec, 4), _wprime(want, 4), rtol=1e-9, atol=1e-10)
    assert len(method._roots) == 1


def test_registered_with_a_typed_config():
    assert METHODS["kfac-svd"] is KFACSVD
    assert KFACSVD.needs == ("input_gram", "output_grad_gram")
    cfg = KFACSVDConfig()
    assert (cfg.alpha_a, cfg.alpha_g, cfg.left_factor) == (0.1, 0.3, "kfac")
    for bad in ({"alpha": 0.1}, {"alpha_a": -0.1}, {"alpha_g": 1.0}, {"left_factor": "cholesky"}):
        with pytest.raises(ValidationError):
            KFACSVDConfig(**bad)
