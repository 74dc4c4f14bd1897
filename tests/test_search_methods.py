"""``search`` across methods (issue 24 part 1): a stage's ``methods: [...]`` (a group of stages offering
alternatives for the same modules), MoDeGPT units competing with the same modules compressed Linear by Linear
under one budget, solved exactly; the mixed checkpoint loads without lrc and resumes byte-identically."""
import pytest
import torch

from compress.api import compress_model
from compress.errors import LrcError
from compress.recipe import parse_recipe

OPTS = {"trials": 3, "samples": 2, "temperature": 0.6, "k_min": 0.1}


def _recipe(corpus, methods=("modegpt", "svd-llm"), ratio=0.6, **stage):
    return parse_recipe({"calibration": {"dataset": str(corpus), "samples": 8, "seq_len": 32},
                         "engine": {"device": "cpu", "batch_size": 3},
                         "stages": [{"methods": list(methods), "param_ratio": ratio, "allocator": "search",
                                     "allocator_options": OPTS, **stage}], "samples": 0})


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_methods_expand_into_a_group():
    r = _recipe("x.txt", options={"modegpt": {"ridge": 0.1}})
    assert [s.method for s in r.stages] == ["modegpt", "svd-llm"]
    assert {s.group for s in r.stages} == {"stages[0]"} and r.siblings(1) == [0, 1]
    assert r.method_config(0).ridge == 0.1
    assert r.resolved()["stages"][0]["group"] == "stages[0]"
    back = parse_recipe(r.resolved())  # the resolved recipe reads back as written
    assert [(s.method, s.group) for s in back.stages] == [(s.method, s.group) for s in r.stages]


@pytest.mark.parametrize("bad, field", [
    ({"methods": ["svd-llm", "asvd"], "allocator": "uniform"}, "group"),
    ({"methods": ["svd-llm", "svd-llm"]}, "group"),
    ({"methods": ["svd-llm", "asvd"], "method": "svd"}, "method"),
    ({"methods": ["svd-llm", "asvd"], "options": {"svd": {}}}, "options"),
])
def test_bad_groups_are_one_line_errors(bad, field):
    stage = {"param_ratio": 0.8, "allocator": "search", **bad}
    with pytest.raises(LrcError, match=field):
        parse_recipe({"stages": [stage]})


def test_search_across_methods_meets_the_budget_and_reloads(tiny_model_dir, tokenizer, corpus_file, tmp_path):
    """MoDeGPT units and svd-llm Linears compete for the same modules: every module ends with one row (one
    method), the budget over the modules holds, and the report keeps both methods' candidates."""
    recipe = _recipe(corpus_file)
    model = _load(tiny_model_dir("llama"))
    report = compress_model(model, recipe, tokenizer, cache_dir=tmp_path / "c")
    record = report["allocation"]["0"]
    assert record["params"] <= record["budget"]
    methods = {v["method"] for v in record["rows"].values()}
    assert methods == {"modegpt", "svd-llm"}
    assert any(v["chosen"] is None for v in record["rows"].values())  # alternatives not taken
    unit = next(v for v in record["rows"].values() if v["method"] == "modegpt")
    assert len(unit["candidates"]) > 3 and unit["anchor_kl"] > 0
    names = [m for r in report["modules"] for m in ([r["name"]] if "members" not in r else r["members"].values())]
    assert len(names) == len(set(names))  # one row per module
    t = report["targeted"]
    assert t["params_after"] <= 0.6 * t["params_before"] + 1
    assert abs(t["params_after"] - record["params"]) <= 0.01 * record["params"]


def test_one_method_and_no_depth_is_a_plain_rank_search(tiny_model_dir, tokenizer, corpus_file, tmp_path):
    """``methods: [svd-llm]`` alone is the one-method search (the same ranks as allocator search without a group)."""
    base = dict(allocator_options={**OPTS, "trials": 0, "gamma": 0})
    one = _recipe(corpus_file, methods=("svd-llm",), **base)
    plain = parse_recipe({**one.model_dump(), "stages": [{"method": "svd-llm", "param_ratio": 0.6,
                                                          "allocator": "search", **base}]})
    ranks = []
    for i, r in enumerate((one, plain)):
        rep = compress_model(_load(tiny_model_dir("llama")), r, tokenizer, cache_dir=tmp_path / f"c{i}")
        ranks.append({m["name"]: m.get("rank") for m in rep["modules"]})
    assert ranks[0] == ranks[1]



def test_mixed_checkpoint_reloads_resumes_and_finetunes(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """GQA (qwen2): the mixed checkpoint (resized MoDeGPT modules beside low-rank factors) loads in a process that
    cannot import lrc with the logits of the model in memory; a run killed after block 1 resumes to the bytes of
    an uninterrupted one; ``lrc finetune`` trains it."""
    from compress import api
    from compress.finetune import FinetuneConfig
    from compress.finetune.run import finetune
    from conftest import reload_logits, resume_after_crash

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    model = str(tiny_model_dir("qwen2"))
    recipe = _recipe(corpus_file, ratio=0.5)
    out, report = api.compress(model, recipe, tmp_path / "a", cache_dir=tmp_path / "c1", progress=False)
    types = {r["type"] for r in report["modules"]}
    assert "structured" in types and "lowrank" in types, types  # both methods chosen somewhere
    x = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reload_logits(tmp_path / "a", x, tmp_path), out(x).logits, atol=1e-5, rtol=0)

    again = resume_after_crash(monkeypatch, model, recipe, tmp_path / "b", tmp_path / "c2", tmp_path / "a")
    assert again["allocation"] == report["allocation"]
    ft = finetune(str(tmp_path / "a"), FinetuneConfig(data=str(corpus_file), steps=4, lr=1e-3, warmup=1,
                                                      batch_size=4, seq_len=32, holdout=4, eval_every=2,
                                                      train="all"), tmp_path / "ft", device="cpu")
    assert ft["finetune"]["held_out_loss_after"] < ft["finetune"]["held_out_loss_before"]


def test_units_trial_kl_is_the_kl_of_the_model_that_comes_out(tiny_model_dir, tokenizer, corpus_file, tmp_path):
    """MoDeGPT's units alone under the search, original propagation, one statistics pass per block: the engine
    rebuilds each unit from the dense block's statistics exactly as the trials did, so the KL measured for the
    chosen trial is the KL of the compressed model; each unit's measured curve falls from its anchor knob."""
    from compress.calibration import calibration_tokens

    recipe = _recipe(corpus_file, methods=("modegpt",), ratio=0.6)
    recipe = parse_recipe({**recipe.model_dump(), "engine": {"device": "cpu", "batch_size": 3,
                                                             "propagate": "original", "sequential": False}})
    dense = _load(tiny_model_dir("llama"))
    model = _load(tiny_model_dir("llama"))
    report = compress_model(model, recipe, tokenizer, cache_dir=tmp_path / "c")
    record = report["allocation"]["0"]
    chosen = record["trials"][record["chosen"]]
    assert chosen["kl"] == min(t["kl"] for t in record["trials"])
    knobs = {v["candidates"][v["chosen"]]["knob"] for v in record["rows"].values()}
    assert len(knobs) > 1  # not uniform
    for v in record["rows"].values():
        errs = [c["error"] for c in v["candidates"][1:]]
        assert v["anchor_kl"] > 0 and errs[0] > errs[-1]
    ids = calibration_tokens(dense, tokenizer, recipe.calibration, tmp_path)[:OPTS["samples"]]
    keep = ids.shape[1] - ids.shape[1] // 2
    with torch.no_grad():
        ref = torch.log_softmax(dense(ids).logits[:, -keep:].float() / OPTS["temperature"], -1)
        mine = torch.log_softmax(model(ids).logits[:, -keep:].float() / OPTS["temperature"], -1)
    assert float((ref.exp() * (ref - mine)).sum(-1).mean()) == pytest.approx(chosen["kl"], rel=2e-3)
