"""MoDeGPT through the whole pipeline (methods.md §5): budget and per-layer parameter counts, rebuilt modules that
reproduce the dense model at φ = 0, checkpoints that reload with the same logits, Qwen3 and unsupported
architectures, resume, and the real stories260k against plain SVD."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress import api
from compress.engine import pipeline
from compress.errors import LrcError
from compress.plan import make_plan
from compress.recipe import parse_recipe
from conftest import ROOT, STORIES, needs_shared, tiny_config, tiny_recipe

IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 8, 4, 11, 6, 2]])


def modegpt_recipe(corpus, ratio=0.8, allocator="uniform", modules=("mlp", "qk", "vo"), **stage):
    return tiny_recipe(corpus, "modegpt", param_ratio=ratio, allocator=allocator,
                       options={"modules": list(modules)}, **stage)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@torch.no_grad()
def logits(model, ids=IDS):
    return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_budget_and_per_layer_counts(tiny_model_dir, corpus_file, tokenizer, arch):
    model = load(tiny_model_dir(arch))
    recipe = modegpt_recipe(corpus_file)
    report = api.compress_model(model, recipe, tokenizer, cache_dir=corpus_file.parent / f"c-{arch}")
    t = report["targeted"]
    assert t["structured_units"] == 9  # 3 blocks x (mlp, qk, vo)
    assert abs(t["kept_fraction_of_targeted"] - 0.8) < 0.03  # kept dims are rounded (q/k to RoPE pairs)
    for row in report["modules"]:  # every unit keeps (1 − φ) of its parameters up to one kept dim
        per_dim = (row["params_before"] - (64 if row["unit"] == "vo" and arch == "qwen2" else 0)) / row["dense_dim"]
        assert abs(row["params_after"] - 0.8 * row["params_before"]) <= 2 * per_dim + 64
    for b in report["blocks"]:
        assert abs(b["kept_fraction"] - 0.8) < 0.05
    # the model really has the smaller shapes, and still runs
    att = model.model.layers[0].self_attn
    assert type(att).__name__ == "LrcAttention" and att.k_proj.out_features == 2 * att.qk_dim < 2 * 16
    assert model.model.layers[0].mlp.gate_proj.out_features == round(0.8 * 96)
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_full_dims_reproduce_the_dense_model(tiny_model_dir, corpus_file, tokenizer, arch):
    """φ = 0 through the rebuilt modules (masks, gathered RoPE, scaling, folded v bias) and the KV cache."""
    from compress.engine.units import compress_units  # noqa: F401  (the path under test)
    from compress.methods.modegpt import MoDeGPT
    from compress.plan_units import allocate_units, unit_rows
    from compress.roles import block_roles

    dense, model = load(tiny_model_dir(arch)), load(tiny_model_dir(arch))
    if arch == "qwen2":  # give v a bias to fold
        for m in (dense, model):
            torch.manual_seed(1)
            for layer in m.model.layers:
                layer.self_attn.v_proj.bias.data.normal_()
    recipe = modegpt_recipe(corpus_file, ratio=1.0)
    rows, _ = unit_rows(model, recipe, 0, {})
    allocate_units(recipe.stages[0], rows)
    method = MoDeGPT()
    torch.manual_seed(0)
    for i, layer in enumerate(model.model.layers):
        att, mlp = block_roles(layer, model.config, {"mlp", "qk", "vo"}, f"layers.{i}")
        mine = {r.kind: r for r in rows if r.block == i}
        x = torch.randn(200, 64)
        stats = {"output_sq": {r.members[k]: (x @ layer.get_submodule(r.members[k].split(f"layers.{i}.")[1])
                                              .weight.T).square().sum(0).double()
                               for r in [mine["qk"]] for k in ("q", "k")},
                 "input_gram": {mine["vo"].members["v"]: (x.T @ x).double(),
                                mine["mlp"].members["down"]: (lambda z: z.T @ z)(torch.randn(300, 96)).double()}}
        method.apply_attention(layer, f"model.layers.{i}.", att, {"qk": mine["qk"], "vo": mine["vo"]}, stats)
        method.apply_mlp(layer, f"model.layers.{i}.", mine["mlp"], stats)
    assert type(model.model.layers[0].self_attn).__name__ == "LrcAttention"
    torch.testing.assert_close(logits(model), logits(dense), atol=1e-4, rtol=1e-4)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(IDS[:, :5], **gen), dense.generate(IDS[:, :5], **gen))


def test_checkpoint_reloads_with_the_same_logits(tiny_model_dir, corpus_file, tokenizer, tmp_path):
    model = load(tiny_model_dir("qwen2"))
    recipe = modegpt_recipe(corpus_file, ratio=0.6)
    report = api.compress_model(model, recipe, tokenizer, cache_dir=tmp_path / "c")
    api.save(model, tokenizer, tmp_path / "ck", report)
    want = logits(model)
    torch.testing.assert_close(logits(api.load(tmp_path / "ck")), want, atol=1e-5, rtol=1e-5)
    code = ("import sys, torch; from transformers import AutoModelForCausalLM as A; "
            "m = A.from_pretrained(sys.argv[1], trust_remote_code=True).eval(); "
            "assert 'compress' not in sys.modules; "
            f"ids = torch.tensor({IDS.tolist()}); "
            "torch.save(m(ids).logits, sys.argv[2]); "
            "out = m.generate(ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True); "
            "k = out.past_key_values.layers[0].keys; v = out.past_key_values.layers[0].values; "
            "print(k.shape[-1], v.shape[-1])")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck"), str(tmp_path / "l.pt")],
                         capture_output=True, text=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1",
                                                                             "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), want, atol=1e-5, rtol=1e-5)
    att = model.model.layers[0].self_attn  # the KV cache holds the kept head dims only
    assert res.stdout.split() == [str(att.qk_dim), str(att.vo_dim)] and att.vo_dim < 16


def test_block_influence_allocation(tiny_model_dir, corpus_file, tokenizer):
    model = load(tiny_model_dir("llama"))
    recipe = modegpt_recipe(corpus_file, ratio=0.7, allocator="block_influence",
                            allocator_options={"epsilon": 0.02, "phi_max": 0.6})
    report = api.compress_model(model, recipe, tokenizer, cache_dir=corpus_file.parent / "c-infl")
    targets = [b["kept_fraction_target"] for b in report["blocks"]]
    assert abs(sum(1 - t for t in targets) / len(targets) - 0.3) < 1e-5  # mean φ = φ_avg after clipping
    assert max(1 - t for t in targets) <= 0.6 + 1e-9 and len(set(targets)) > 1
    assert abs(report["targeted"]["kept_fraction_of_targeted"] - 0.7) < 0.03


def test_plan_shows_each_unit_knob_and_cost(tiny_model_dir, corpus_file):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("mistral"))  # made outside the meta context
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    rows = make_plan(model, modegpt_recipe(corpus_file, ratio=0.5))
    kinds = [(r.kind, r.knob, r.dim) for r in rows if r.block == 0]
    assert kinds == [("mlp", 48, 96), ("qk", 8, 16), ("vo", 8, 16)]
    assert all(r.params_after < r.params_before for r in rows)


def test_qwen3_keeps_qk_and_says_so(tokenizer, corpus_file, tmp_path):
    from transformers import Qwen3Config

    cfg = tiny_config("llama", len(tokenizer)).to_dict()
    cfg = Qwen3Config(**{k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "bos_token_id",
                                             "eos_token_id")}, head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    report = api.compress_model(model, modegpt_recipe(corpus_file), tokenizer, cache_dir=tmp_path)
    units = {r["unit"] for r in report["modules"]}
    assert units == {"mlp", "vo"}
    assert all("type II skipped" in r["note"] for r in report["modules"])
    assert model.model.layers[0].self_attn.qk_dim == 16 and model.model.layers[0].self_attn.vo_dim < 16
    api.save(model, tokenizer, tmp_path / "ck", report)
    torch.testing.assert_close(logits(api.load(tmp_path / "ck")), logits(model), atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_is_one_line(tokenizer, corpus_file):
    from transformers import Phi3Config

    cfg = Phi3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(LrcError, match="no attention module with separate q/k/v/o") as e:
        make_plan(model, modegpt_recipe(corpus_file))
    assert "\n" not in str(e.value)
    with pytest.raises(LrcError, match="no gated MLP"):
        make_plan(model, modegpt_recipe(corpus_file, modules=("mlp",)))


def test_bad_budgets_are_one_line(tiny_model_dir, corpus_file):
    model = load(tiny_model_dir("llama"))
    with pytest.raises(LrcError, match="takes a param_ratio"):
        make_plan(model, tiny_recipe(corpus_file, "modegpt", rank=4))
    with pytest.raises(LrcError, match="welore cannot allocate modegpt's units; use uniform or block_influence"):
        modegpt_recipe(corpus_file, allocator="welore")


def test_block_influence_allocates_a_low_rank_method_too(tiny_model_dir, corpus_file, tokenizer):
    model = load(tiny_model_dir("llama"))
    recipe = tiny_recipe(corpus_file, "svd-llm", param_ratio=0.6, allocator="block_influence",
                         allocator_options={"epsilon": 0.02, "phi_max": 0.7})
    report = api.compress_model(model, recipe, tokenizer, cache_dir=corpus_file.parent / "c-infl-svd")
    ranks = {}
    for r in report["modules"]:
        ranks.setdefault(r["name"].split(".")[2], []).append(r["rank"])
    assert len({tuple(v) for v in ranks.values()}) > 1  # blocks get different shares
    assert abs(report["targeted"]["kept_fraction_of_targeted"] - 0.6) < 0.03


def test_resume_gives_the_same_checkpoint(tiny_model_dir, corpus_file, tokenizer, tmp_path, monkeypatch):
    recipe = modegpt_recipe(corpus_file, allocator="block_influence")
    full = load(tiny_model_dir("mistral"))
    api.compress_model(full, recipe, tokenizer, cache_dir=tmp_path / "a")

    def crash(i):
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "after_block", crash)
    model = load(tiny_model_dir("mistral"))
    with pytest.raises(KeyboardInterrupt):
        api.compress_model(model, recipe, tokenizer, cache_dir=tmp_path / "b")
    monkeypatch.setattr(pipeline, "after_block", lambda i: None)
    model = load(tiny_model_dir("mistral"))
    report = api.compress_model(model, recipe, tokenizer, cache_dir=tmp_path / "b", resume=True)
    assert report["resumed_from_block"] == 2
    sd, want = model.state_dict(), full.state_dict()
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in sd)


@needs_shared()
def test_stories260k_modegpt_beats_svd_at_08(tmp_path):
    from compress.eval.perplexity import perplexity

    text = (ROOT / "tests" / "data" / "tinystories_style.txt").read_text()
    tok = AutoTokenizer.from_pretrained(STORIES)
    ppl = {}
    for method in ("svd", "modegpt"):
        model = load(STORIES)
        recipe = parse_recipe({"calibration": {"dataset": "selfgen", "samples": 32, "seq_len": 128},
                               "engine": {"device": "cpu"},
                               "stages": [{"method": method, "param_ratio": 0.8}]})
        report = api.compress_model(model, recipe, tok, cache_dir=tmp_path)
        assert abs(report["targeted"]["kept_fraction_of_targeted"] - 0.8) < 0.03
        ppl[method] = perplexity(model, tok, text, seq_len=128).perplexity
    assert ppl["modegpt"] < ppl["svd"], ppl
