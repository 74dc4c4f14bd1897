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
    """φ = 0: the identity paths of the rebuilt modules and the KV cache reproduce the dense model (a v bias stays
    on v here; dims that compress: ``test_compressed_attention_matches_a_hand_reference``)."""
    from compress.engine.units import compress_units  # noqa: F401  (the path under test)
    from compress.methods.modegpt import MoDeGPT
    from compress.allocation.units import allocate_units
    from compress.plan_units import unit_rows
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
        att, mlp = block_roles(layer, model.config, {"attention", "mlp"}, f"layers.{i}")
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


def test_kept_dims_round_up_as_the_paper(tiny_model_dir, corpus_file):
    """methods.md §5: k = ⌈(1 − φ)·d⌉ kept dims (φ = 1 − param_ratio); q/k in whole RoPE pairs, never below it.
    At 0.7: intermediate 67.2 -> 68, v/o 11.2 -> 12, q/k 11.2 -> 12 (half-up rounding kept 67 and 11)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("llama"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for ratio, want in ((0.7, [("mlp", 68), ("qk", 12), ("vo", 12)]), (0.8, [("mlp", 77), ("qk", 14), ("vo", 13)]),
                        (0.3, [("mlp", 29), ("qk", 6), ("vo", 5)])):
        rows = make_plan(model, modegpt_recipe(corpus_file, ratio=ratio))
        assert [(r.kind, r.knob) for r in rows if r.block == 0] == want, ratio
        for r in rows:
            assert ratio * r.dim - 1e-9 <= r.knob < ratio * r.dim + r.multiple  # the least multiple at or above


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
def test_stories260k_modegpt_beats_svd_at_075(tmp_path):
    """At 0.75 kept every unit of stories260k (intermediate 172, head dim 8) keeps exactly 3/4 of its dims
    (129, 6, 6), so both methods keep the same parameters: at 0.8 MoDeGPT's ⌈(1 − φ)·d⌉ keeps q/k whole (6.4 -> 8) and
    7 of 8 v/o dims, 0.839 of the parameters."""
    from compress.eval.perplexity import perplexity

    text = (ROOT / "tests" / "data" / "tinystories_style.txt").read_text()
    tok = AutoTokenizer.from_pretrained(STORIES)
    ppl = {}
    for method in ("svd", "modegpt"):
        model = load(STORIES)
        recipe = parse_recipe({"calibration": {"dataset": "selfgen", "samples": 32, "seq_len": 128},
                               "engine": {"device": "cpu"},
                               "stages": [{"method": method, "param_ratio": 0.75}]})
        report = api.compress_model(model, recipe, tok, cache_dir=tmp_path)
        assert abs(report["targeted"]["kept_fraction_of_targeted"] - 0.75) < (0.03 if method == "svd" else 1e-9)
        ppl[method] = perplexity(model, tok, text, seq_len=128).perplexity
    assert ppl["modegpt"] < ppl["svd"], ppl


# compressing ratios: the rebuilt attention against a reference built by hand -------------------------------------

def _attention_stats(layer, rows, seed):
    """Random statistics for one layer's q/k and v/o units: positive q/k output squares (so the kept pairs differ
    between KV groups and from the first pairs) and the Gram of random attention inputs."""
    gen = torch.Generator().manual_seed(seed)
    qk, vo = rows["qk"], rows["vo"]
    x = torch.randn(300, layer.self_attn.q_proj.in_features, generator=gen)
    return {"output_sq": {qk.members[r]: torch.rand(layer.get_submodule(qk.members[r].split(".", 3)[3])
                                                    .out_features, generator=gen).double() ** 4 for r in ("q", "k")},
            "input_gram": {vo.members["v"]: (x.T @ x).double()}}


@torch.no_grad()
def _reference_attention(dense_att, new_att, x, cos, sin, keep, index, H, Hkv, d):
    """The attention of one layer built by hand: q/k of the DENSE weights with the FULL RoPE, then the kept dims
    selected (``index`` per KV group); scores scaled by 1/√d (the original head dim); causal and padding mask from
    the 2-D ``keep`` (1 = token); values from the rebuilt v/o weights, and the dense v bias carried through the
    attention weights to the dense o (not the folded o bias). Returns (output (B, T, h), probabilities (B, H, T, T))."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, T, _ = x.shape
    G = H // Hkv
    q = dense_att.q_proj(x).view(B, T, H, d).transpose(1, 2)
    k = dense_att.k_proj(x).view(B, T, Hkv, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)  # full head dim, then projected
    qs = torch.stack([q[:, j][..., index[j // G]] for j in range(H)], 1)
    ks = torch.stack([k[:, j // G][..., index[j // G]] for j in range(H)], 1)
    scores = qs @ ks.transpose(-1, -2) / d ** 0.5
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & keep.bool()[:, None, None, :]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    vo = new_att.vo_dim
    v = new_att.v_proj(x).view(B, T, Hkv, vo).transpose(1, 2)
    out = torch.stack([probs[:, j] @ v[:, j // G] for j in range(H)], 1)  # (B, H, T, vo)
    y = out.transpose(1, 2).reshape(B, T, H * vo) @ new_att.o_proj.weight.T
    if dense_att.v_proj.bias is not None:  # Σ_j W_o,j (A_j · 1 b_v,g(j)ᵀ): the bias through the attention
        bv = dense_att.v_proj.bias.view(Hkv, d)
        Wo = dense_att.o_proj.weight.view(-1, H, d)
        for j in range(H):
            y = y + (probs[:, j] @ bv[j // G].expand(T, d)) @ Wo[:, j].T
    if dense_att.o_proj.bias is not None:
        y = y + dense_att.o_proj.bias
    return y, probs


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("qk,vo", [(10, 7), (6, 12)])
def test_compressed_attention_matches_a_hand_reference(tiny_model_dir, corpus_file, impl, qk, vo):
    """MoDeGPT's attention at dims that compress (q/k 10 or 6 of 16, v/o 7 or 12; both orders of the unequal head
    sizes SDPA pads): per layer, the rebuilt ``LrcAttention``'s output (and eager's attention probabilities) on a
    left-padded batch equals ``_reference_attention`` on the valid query rows: the selection at the chosen RoPE
    pairs per KV group, cos/sin gathered there = full RoPE then projected, scaling 1/√16, causal and padding
    masks, the v bias folded into a new o bias. Changing padded or later tokens changes no valid earlier output,
    and the KV cache gives the logits of a full forward."""
    import copy

    from compress.methods.modegpt import MoDeGPT
    from compress.allocation.units import allocate_units
    from compress.plan_units import unit_rows
    from compress.roles import block_roles

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2"), attn_implementation=impl).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            att = layer.self_attn
            att.q_proj.weight *= 15  # scores of order 1, so a wrong dim, RoPE angle or scale shows
            att.k_proj.weight *= 15
            att.v_proj.bias.normal_()  # a v bias to fold (Qwen2's o has none: the fold makes one)
    dense = copy.deepcopy(model)
    recipe = modegpt_recipe(corpus_file, ratio=0.6, modules=("qk", "vo"))
    rows, _ = unit_rows(model, recipe, 0, {})
    allocate_units(recipe.stages[0], rows)
    H, Hkv, d = 4, 2, 16
    indices = []
    for i, layer in enumerate(model.model.layers):
        mine = {r.kind: r for r in rows if r.block == i}
        mine["qk"].knob, mine["vo"].knob = qk, vo
        att, _ = block_roles(layer, model.config, {"attention"}, f"layers.{i}")
        MoDeGPT().apply_attention(layer, f"model.layers.{i}.", att, mine, _attention_stats(layer, mine, 10 + i))
        new = layer.self_attn
        assert type(new).__name__ == "LrcAttention" and (new.qk_dim, new.vo_dim) == (qk, vo)
        assert new.o_proj.bias is not None and new.v_proj.bias is None  # folded
        indices.append(new.rope_index.clone())
    first = torch.cat([torch.arange(qk // 2), torch.arange(qk // 2) + d // 2])
    assert any(not torch.equal(ix[g], first) for ix in indices for g in range(Hkv))  # not the default pairs
    assert any(not torch.equal(ix[0], ix[1]) for ix in indices)  # the KV groups keep different pairs

    gen = torch.Generator().manual_seed(4)
    T, pad = 12, 4
    ids = torch.randint(3, 200, (2, T), generator=gen)
    keep = torch.ones(2, T, dtype=torch.long)
    keep[0, :pad] = 0  # left padding in the first row
    seen = {}
    hooks = [layer.self_attn.register_forward_hook(
        lambda m, a, kw, out, i=i: seen.__setitem__(i, (kw.get("hidden_states", a[0] if a else None), out)),
        with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        want = model(ids, attention_mask=keep, output_attentions=impl == "eager").logits
    for h in hooks:
        h.remove()
    valid = keep.bool()  # query rows that are tokens (a padded row's output is not defined)
    for i, layer in enumerate(model.model.layers):
        x, (out, weights) = seen[i]
        cos, sin = model.model.rotary_emb(x, torch.arange(T)[None].expand(2, T))
        ref, probs = _reference_attention(dense.model.layers[i].self_attn, layer.self_attn, x, cos, sin, keep,
                                          indices[i], H, Hkv, d)
        torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-4)
        if impl == "eager":
            torch.testing.assert_close(weights.transpose(1, 2)[valid], probs.transpose(1, 2)[valid],
                                       atol=2e-6, rtol=1e-4)
    # masks: other tokens under the padding, or a different last token, change no valid earlier position
    other = ids.clone()
    other[0, :pad] = torch.randint(3, 200, (pad,), generator=gen)
    other[:, -1] = (ids[:, -1] + 1) % 200
    with torch.no_grad():
        got = model(other, attention_mask=keep).logits
    torch.testing.assert_close(got[:, :-1][valid[:, :-1]], want[:, :-1][valid[:, :-1]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[:, -1], want[:, -1], atol=1e-3)  # the last token itself does matter
    # the KV cache (compressed q/k and v heads of different sizes) gives the full forward's logits
    import inspect

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5.2x
    with torch.no_grad():
        step = model(ids[1:, :T - 2], use_cache=True)
        cache, tail = getattr(step, key), []
        for t in range(T - 2, T):
            step = model(ids[1:, t:t + 1], use_cache=True, **{key: cache})
            cache = getattr(step, key)
            tail.append(step.logits[:, -1])
    torch.testing.assert_close(torch.stack(tail, 1), want[1:, -2:], atol=1e-5, rtol=1e-5)
    k_cache = cache.layers[0].keys
    assert k_cache.shape[-1] == qk and cache.layers[0].values.shape[-1] == vo


def test_report_columns_mean_one_thing_each(tiny_model_dir, corpus_file, tmp_path):
    """``rel_error`` is ‖ΔY‖/‖Y‖ of a unit's output (mlp, vo) or not measured (None, blank in the CSV) for q/k, whose
    CR-bound share of dropped pair scores has its own column ``dropped_score_share``; the running mean of the plain
    progress and the summary's error line take the measured ones only. A low-rank run's CSV has no such column."""
    import csv
    import io
    import json

    from rich.console import Console

    from compress.progress import Progress
    from compress.report import CSV_FIELDS, summary_table

    recipe = modegpt_recipe(corpus_file, ratio=0.6)
    _, report = api.compress(str(tiny_model_dir("llama")), recipe, tmp_path / "ck", cache_dir=tmp_path / "c",
                             progress=False)
    rows = json.loads((tmp_path / "ck" / "lrc_report.json").read_text())["modules"]
    assert rows == json.loads(json.dumps(report["modules"]))
    for r in rows:
        if r["unit"] == "qk":
            assert r["rel_error"] is None and 0 < r["dropped_score_share"] < 1, r
        else:
            assert 0 < r["rel_error"] < 1 and "dropped_score_share" not in r, r
    with open(tmp_path / "ck" / "lrc_modules.csv") as f:
        table = list(csv.DictReader(f))
    header = list(table[0])
    assert header == CSV_FIELDS[:CSV_FIELDS.index("rel_error") + 1] + ["dropped_score_share"] + \
        CSV_FIELDS[CSV_FIELDS.index("rel_error") + 1:]
    for r, c in zip(rows, table):
        assert c["rel_error"] == ("" if r["rel_error"] is None else str(r["rel_error"]))
        assert c["dropped_score_share"] == str(r.get("dropped_score_share", ""))
    # the running mean of a block's line: mlp and vo only
    buf = io.StringIO()
    p = Progress(console=Console(file=buf, width=200), mode="plain")
    p.start_blocks(3, 0)
    p.block(0)
    block0 = [r for r in rows if r["block"] == 0]
    p.block_done(0, block0 + [{**block0[0], "kept_dim": block0[0]["dense_dim"], "rel_error": 0.0}])  # + one kept
    p.close()
    want = [r["rel_error"] for r in block0 if r["unit"] != "qk"]
    assert f"mean rel. error {sum(want) / len(want):.4f}" in buf.getvalue()
    out = io.StringIO()
    Console(file=out, width=200).print(summary_table(report))
    errs = [r["rel_error"] for r in rows if r["unit"] != "qk"]
    assert f"mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}" in out.getvalue()
    # a low-rank run: the CSV header and its rows' fields as they always were
    _, lowrank = api.compress(str(tiny_model_dir("llama")), tiny_recipe(corpus_file, param_ratio=0.6),
                              tmp_path / "lr", cache_dir=tmp_path / "c2", progress=False, return_model=False)
    with open(tmp_path / "lr" / "lrc_modules.csv") as f:
        assert next(csv.reader(f)) == CSV_FIELDS
    assert not any("dropped_score_share" in r for r in lowrank["modules"])
