"""Numerical guards: damping 0 on a rank-deficient Gram, two compensation stages on one module, ``align`` in every
allocator, and the documented error of the dense objective."""
import pytest
import torch

from compress import api
from compress.linalg import align_rank, dense_target
from compress.recipe import parse_recipe
from conftest import tiny_recipe


def test_dense_target_without_damping_on_a_rank_deficient_gram():
    """``damping: 0`` was a division by zero eigenvalues (NaN); now it is the least-squares fit on the span of X̃
    and W elsewhere: the fit is as good as lstsq's, and directions X̃ never takes keep W."""
    torch.manual_seed(0)
    m, n, t = 6, 16, 5  # 5 tokens: H_c has rank 5 of 16
    W = torch.randn(m, n, dtype=torch.float64)
    X = torch.randn(n, t, dtype=torch.float64)
    Xc = X + 0.1 * torch.randn(n, t, dtype=torch.float64)
    Wt = dense_target(W, Xc @ Xc.T, X @ Xc.T, damping=0.0)
    assert torch.isfinite(Wt).all()
    best = torch.linalg.lstsq(Xc.T, (W @ X).T).solution.T  # some least-squares solution
    assert torch.linalg.norm(W @ X - Wt @ Xc) == pytest.approx(float(torch.linalg.norm(W @ X - best @ Xc)), rel=1e-8)
    q, _ = torch.linalg.qr(Xc, mode="complete")
    null = q[:, t:]  # directions orthogonal to every compressed input
    assert torch.allclose(Wt @ null, W @ null, atol=1e-8)


def test_dense_objective_with_zero_damping_runs_on_tiny_calibration(tiny_model_dir, corpus_file, tmp_path):
    recipe = tiny_recipe(corpus_file, samples=1, seq_len=8, objective="dense", dense_damping=0.0)
    net, report = api.compress(str(tiny_model_dir("llama")), recipe, tmp_path / "o", cache_dir=tmp_path / "c",
                               progress=False)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert all(row["rel_error"] == row["rel_error"] for row in report["modules"])  # no NaN in the report


def test_two_compensation_stages_on_one_module(tiny_model_dir, corpus_file, tmp_path):
    """Two ``eora`` stages passed ``lrc plan`` and crashed mid-run with a KeyError; now the second repairs what the
    first left, against the same original weight, and the checkpoint reloads."""
    from compress import load

    recipe = parse_recipe({"calibration": {"dataset": str(corpus_file), "samples": 8, "seq_len": 32},
                           "engine": {"device": "cpu", "batch_size": 4},
                           "stages": [{"method": "svd", "param_ratio": 0.4}, {"method": "eora", "rank": 2},
                                      {"method": "eora", "rank": 2}]})
    net, report = api.compress(str(tiny_model_dir("llama")), recipe, tmp_path / "o", cache_dir=tmp_path / "c",
                               progress=False)
    rows = [r for r in report["modules"] if r["name"] == "model.layers.1.self_attn.q_proj"]  # same inputs in every pass
    assert [r["stage"] for r in rows] == [0, 1, 2]
    assert rows[2]["rel_error"] <= rows[2]["base_error"] + 1e-9
    assert rows[2]["base_error"] == pytest.approx(rows[1]["rel_error"], rel=1e-4)
    ids = torch.randint(3, 150, (1, 10))
    with torch.no_grad():
        assert torch.allclose(net(ids).logits, load(tmp_path / "o")(ids).logits, atol=1e-5)


def test_align_rank():
    assert align_rank(37, 8, 64, 96) == 32
    assert align_rank(37, 8, 64, 96, up=True) == 40
    assert align_rank(3, 8, 64, 96) == 8  # never below one aligned step
    assert align_rank(70, 8, 64, 96, up=True) == 64  # capped by min(m, n)
    assert align_rank(5, 8, 4, 96) == 4


@pytest.mark.parametrize("allocator,budget", [("uniform", {"param_ratio": 0.6}), ("uniform", {"energy": 0.9}),
                                              ("energy", {"param_ratio": 0.6}), ("welore", {"param_ratio": 0.6}),
                                              ("loss", {"param_ratio": 0.6}),
                                              ("sensitivity", {"param_ratio": 0.6})])
def test_align_is_honoured_by_every_allocator(allocator, budget, tiny_model_dir, corpus_file, tmp_path):
    opts = {"allocator_options": {"ratios": [0.3, 0.6, 0.9], "samples": 2}} if allocator == "sensitivity" else {}
    recipe = tiny_recipe(corpus_file, align=8, allocator=allocator, **budget, **opts)
    _, report = api.compress(str(tiny_model_dir("llama")), recipe, tmp_path / "o", cache_dir=tmp_path / "c",
                             progress=False)
    ranks = [r["rank"] for r in report["modules"] if r["type"] == "lowrank"]
    assert ranks and all(r % 8 == 0 for r in ranks), ranks
    if "param_ratio" in budget:
        assert report["targeted"]["params_after"] <= 0.6 * report["targeted"]["params_before"] + 1


def test_eora_ranks_are_aligned(tiny_model_dir, corpus_file, tmp_path):
    recipe = parse_recipe({"calibration": {"dataset": str(corpus_file), "samples": 8, "seq_len": 32},
                           "engine": {"device": "cpu"},
                           "stages": [{"method": "svd", "param_ratio": 0.5},
                                      {"method": "eora", "param_ratio": 0.1, "allocator": "loss", "align": 4}]})
    with pytest.raises(Exception, match="allocator loss spreads residual ranks"):  # needs the residual first
        api.plan(str(tiny_model_dir("llama")), recipe)
    recipe = parse_recipe({**recipe.model_dump(mode="json"), "stages": [
        {"method": "svd", "param_ratio": 0.5}, {"method": "eora", "param_ratio": 0.1, "align": 4}]})
    rows = api.plan(str(tiny_model_dir("llama")), recipe)
    assert all(r.rank % 4 == 0 for r in rows if r.compensation)


def test_rank_not_a_multiple_of_align_is_a_recipe_error():
    with pytest.raises(Exception, match=r"stages\[0\]: rank 12 is not a multiple of align 8"):
        parse_recipe({"stages": [{"method": "svd", "rank": 12, "align": 8}]})


def test_dense_objective_reports_the_error_against_dense_outputs(tiny_model_dir, corpus_file, tmp_path):
    """``objective: dense``: the report's rel_error is ||W X − W′ X̃|| / ||W X|| (dense inputs X, compressed X̃),
    computed here independently from forwards of the dense and the compressed model on the calibration tokens."""
    from transformers import AutoModelForCausalLM

    from compress.calibration import calibration_tokens

    model_dir = tiny_model_dir("llama")
    recipe = tiny_recipe(corpus_file, param_ratio=0.4, objective="dense")
    net, report = api.compress(str(model_dir), recipe, tmp_path / "o", cache_dir=tmp_path / "c", progress=False)
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    ids = calibration_tokens(dense, AutoTokenizer.from_pretrained(model_dir), recipe.calibration, tmp_path / "c", 3)
    name = "model.layers.2.self_attn.q_proj"

    def inputs(model):
        seen = []
        h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            model(ids)
        h.remove()
        return seen[0].reshape(-1, seen[0].shape[-1]).double()

    X, Xc = inputs(dense), inputs(net)
    W = dense.get_submodule(name).weight.detach().double()
    Wp = net.get_submodule(name).weight_approx.detach().double()
    expected = float(torch.linalg.norm(X @ W.T - Xc @ Wp.T) / torch.linalg.norm(X @ W.T))
    row = next(r for r in report["modules"] if r["name"] == name)
    assert row["rel_error"] == pytest.approx(expected, rel=1e-3)
