"""The ``search`` allocator in the engine (``engine/anchors.py``): measured KL anchors per matrix, whole-model KL per
trial, the budget, the report's record, and that a trial's measured KL is the KL of the model it describes."""
import pytest
import torch

from compress import api
from compress.api import compress_model
from conftest import resume_after_crash, tiny_recipe

OPTS = {"trials": 3, "samples": 2, "temperature": 0.6}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _kl(dense, model, ids, keep, temperature):
    with torch.no_grad():
        ref = torch.log_softmax(dense(ids).logits[:, -keep:].float() / temperature, -1)
        mine = torch.log_softmax(model(ids).logits[:, -keep:].float() / temperature, -1)
    return float((ref.exp() * (ref - mine)).sum(-1).mean())


def test_search_meets_the_budget_and_its_measured_kl_is_the_models(tiny_model_dir, tokenizer, corpus_file, tmp_path):
    """With original propagation the compressed model is exactly the chosen trial's allocation of the dense
    statistics' factors, so the KL the search measured for it is the KL of the model that comes out."""
    from compress.calibration import calibration_tokens

    recipe = tiny_recipe(corpus_file, param_ratio=0.6, allocator="search", allocator_options=OPTS,
                         propagate="original", sequential=False)
    dense = _load(tiny_model_dir("llama"))
    model = _load(tiny_model_dir("llama"))
    report = compress_model(model, recipe, tokenizer, cache_dir=tmp_path / "c")
    record = report["allocation"]["0"]
    assert len(record["trials"]) == 3 and all(t["kl"] is not None for t in record["trials"])
    chosen = record["trials"][record["chosen"]]
    assert chosen["kl"] == min(t["kl"] for t in record["trials"])
    assert record["params"] <= record["budget"]
    assert len(record["additive_kl"]) == len({t["allocation"] for t in record["trials"]})
    assert "additive_rank_correlation" in record
    assert report["targeted"]["params_after"] <= 0.6 * report["targeted"]["params_before"] + 1
    ranks = {r["name"]: r.get("rank") for r in report["modules"]}
    assert len({v for v in ranks.values()}) > 2  # not uniform
    assert all("search" in r["note"] for r in report["modules"])
    ids = calibration_tokens(dense, tokenizer, recipe.calibration, tmp_path)[:OPTS["samples"]]
    measured = _kl(dense, model, ids, ids.shape[1] - ids.shape[1] // 2, OPTS["temperature"])
    assert measured == pytest.approx(chosen["kl"], rel=2e-3)
    # the anchors: every matrix has one, positive, and at its anchor rank
    assert all(v["anchor_kl"] > 0 for v in record["rows"].values())


def test_search_anchor_is_the_kl_of_one_matrix_replaced(tiny_model_dir, tokenizer, corpus_file, tmp_path):
    """One anchor checked against a whole-model forward: the dense model with only that matrix at its anchor
    rank (factors from the same dense statistics)."""
    from compress.calibration import calibration_tokens
    from compress.methods import METHODS

    recipe = tiny_recipe(corpus_file, param_ratio=0.6, allocator="search", allocator_options={**OPTS, "trials": 0},
                         propagate="original", sequential=False)
    model = _load(tiny_model_dir("llama"))
    report = compress_model(model, recipe, tokenizer, cache_dir=tmp_path / "c")
    record = report["allocation"]["0"]
    name = "model.layers.1.mlp.down_proj"
    row = record["rows"][name]
    dense = _load(tiny_model_dir("llama"))
    ids_all = calibration_tokens(dense, tokenizer, recipe.calibration, tmp_path)
    # the input Gram of down_proj in the dense model, over every calibration window (what the pre-pass collects)
    module = dense.get_submodule(name)
    gram = torch.zeros(module.in_features, module.in_features, dtype=torch.float64)

    def collect(m, a):
        x = a[0].reshape(-1, a[0].shape[-1]).double()
        gram.add_(x.T @ x)

    h = module.register_forward_pre_hook(collect)
    with torch.no_grad():
        for s in range(0, ids_all.shape[0], 3):
            dense(ids_all[s:s + 3])
    h.remove()
    spectrum = METHODS["svd-llm"](METHODS["svd-llm"].config_cls()).spectrum(module.weight.detach().double(),
                                                                             {"input_gram": gram})
    A, B = spectrum.factors(row["anchor_knob"])
    one = _load(tiny_model_dir("llama"))
    with torch.no_grad():
        one.get_submodule(name).weight.copy_((A @ B).float())
    ids = ids_all[:OPTS["samples"]]
    expected = _kl(dense, one, ids, ids.shape[1] - ids.shape[1] // 2, OPTS["temperature"])
    assert row["anchor_kl"] == pytest.approx(expected, rel=2e-2)


def test_search_checkpoint_loads_without_lrc_and_resumes_after_a_crash(tiny_model_dir, corpus_file, tmp_path,
                                                                       monkeypatch):
    """Mixed ranks: the checkpoint loads in a process that cannot import lrc with the same logits; a run killed
    after block 1 resumes (anchors, trials and blocks from the run cache) to the bytes of an uninterrupted one."""
    from conftest import reload_logits

    model = str(tiny_model_dir("qwen2"))
    recipe = tiny_recipe(corpus_file, param_ratio=0.5, allocator="search", allocator_options=OPTS)
    out, report = api.compress(model, recipe, tmp_path / "a", cache_dir=tmp_path / "c1", progress=False)
    assert len({r.get("rank") for r in report["modules"]}) > 2
    x = torch.randint(0, 100, (1, 10))
    expected = reload_logits(tmp_path / "a", x, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(expected, out(x).logits, atol=1e-5, rtol=0)

    again = resume_after_crash(monkeypatch, model, recipe, tmp_path / "b", tmp_path / "c2", tmp_path / "a")
    assert again["allocation"] == report["allocation"]


def test_anchors_are_reused_at_another_budget(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """The anchors depend on the model, the calibration and the method, not on the budget or the trials: a second
    run at another ratio measures none (``$LRC_CACHE/search-anchors``)."""
    from compress.engine.anchors import Anchors

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    model = str(tiny_model_dir("llama"))
    api.compress(model, tiny_recipe(corpus_file, param_ratio=0.6, allocator="search", allocator_options=OPTS),
                 tmp_path / "a", cache_dir=tmp_path / "c1", progress=False)
    assert list((tmp_path / "lrc" / "search-anchors").glob("*.safetensors"))

    def no_measuring(self, states):
        raise AssertionError("an anchor was measured again")

    monkeypatch.setattr(Anchors, "_kls", no_measuring)
    _, report = api.compress(model, tiny_recipe(corpus_file, param_ratio=0.75, allocator="search",
                                                allocator_options={**OPTS, "trials": 0}),
                             tmp_path / "b", cache_dir=tmp_path / "c2", progress=False)
    assert report["targeted"]["kept_fraction_of_targeted"] <= 0.75
