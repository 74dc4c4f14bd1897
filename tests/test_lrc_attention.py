"""``LrcAttention`` (MoDeGPT's attention with per-layer q/k and v/o head dims): exact against dense references whose
dropped q/k rows and v rows / o columns are zeroed, for Llama, Qwen2, Mistral and Qwen3 (per-head q/k norms), eager
and sdpa; RoPE gathered at pair-closed indices (a non-closed index is not exact); KV cache shapes; the checkpoint
round trip with plain transformers (lrc not importable) and with ``compress.load``."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import compress
from compress.checkpoint.modeling_lrc import apply_structure, build_module
from compress.methods.modegpt.lrc_attention import LrcAttention
from compress.checkpoint.save import save_checkpoint
from conftest import tiny_config

VOCAB, HEADS, KV, D = 100, 4, 2, 16
ARCHS = ["llama", "qwen2", "mistral", "qwen3"]


def config(arch: str):
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=D, max_position_embeddings=128,
                           bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return tiny_config(arch, VOCAB)


def dense(arch: str, impl: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(arch), attn_implementation=impl).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight *= 15  # scores of order 1 (random init gives almost uniform attention), so that
            attn.k_proj.weight *= 15  # a wrong q/k dim or RoPE angle shows in the logits
            if arch == "llama":  # an o bias too, to be carried over
                attn.o_proj.bias = torch.nn.Parameter(torch.randn(attn.o_proj.out_features) * 0.1)
    return model


def pair_index(qk: int, seed: int) -> torch.Tensor:
    """A random pair-closed ``rope_index`` (one row per KV group): ``[p_1..p_m, p_1+D/2..p_m+D/2]``."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(KV):
        p = torch.randperm(D // 2, generator=gen)[: qk // 2]
        rows.append(torch.cat([p, p + D // 2]))
    return torch.stack(rows)


def subset(k: int, seed: int) -> torch.Tensor:
    """A random selection of ``k`` head dims per KV group (v/o need no pairs)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(D, generator=gen)[:k] for _ in range(KV)])


def rows(index: torch.Tensor, heads: int) -> torch.Tensor:
    """Flat row numbers of a ``heads * D`` projection for a per-KV-group index (query head h uses group h // G)."""
    return torch.cat([h * D + index[h * KV // heads] for h in range(heads)])


def compress_layer(model, layer: int, qk_index=None, vo_index=None, bias=None, force_index=None):
    """Swap in an ``LrcAttention`` with the rows of the dense weights at the indices (full when None); with
    ``force_index`` the module gets that ``rope_index`` unchecked (and those q/k rows)."""
    base = model.model.layers[layer].self_attn
    full = torch.arange(D).repeat(KV, 1)
    qk_index = force_index if force_index is not None else full if qk_index is None else qk_index
    vo_index = full if vo_index is None else vo_index
    new = LrcAttention.from_base(base, qk_index.shape[1], vo_index.shape[1],
                                 rope_index=qk_index if force_index is None else None, bias=bias)
    if force_index is not None:
        new.rope_index.copy_(force_index)
    q, k, v, o = rows(qk_index, HEADS), rows(qk_index, KV), rows(vo_index, KV), rows(vo_index, HEADS)
    with torch.no_grad():
        for name, sel in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            getattr(new, name).weight.copy_(getattr(base, name).weight[sel])
            if getattr(new, name).bias is not None:
                getattr(new, name).bias.copy_(getattr(base, name).bias[sel])
        new.o_proj.weight.copy_(base.o_proj.weight[:, o])
        if new.o_proj.bias is not None:
            b_o = base.o_proj.bias if base.o_proj.bias is not None else torch.zeros(new.o_proj.out_features)
            if base.v_proj.bias is not None and new.v_proj.bias is None:  # fold the v bias: softmax rows sum to 1
                b_v = torch.cat([base.v_proj.bias.view(KV, D)[h * KV // HEADS] for h in range(HEADS)])
                b_o = b_o + base.o_proj.weight[:, o] @ b_v[o]
            new.o_proj.bias.copy_(b_o)
    model.model.layers[layer].self_attn = new
    return new


def mask_layer(model, layer: int, qk_index=None, vo_index=None):
    """The dense reference: zero the q/k rows (and biases) and v rows / o columns outside the indices."""
    attn = model.model.layers[layer].self_attn
    with torch.no_grad():
        for index, names in ((qk_index, ("q_proj", "k_proj")), (vo_index, ("v_proj",))):
            if index is None:
                continue
            for name in names:
                lin = getattr(attn, name)
                drop = torch.ones(lin.out_features, dtype=torch.bool)
                drop[rows(index, lin.out_features // D)] = False
                lin.weight[drop] = 0
                if lin.bias is not None:
                    lin.bias[drop] = 0
        if vo_index is not None:
            drop = torch.ones(HEADS * D, dtype=torch.bool)
            drop[rows(vo_index, HEADS)] = False
            attn.o_proj.weight[:, drop] = 0


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def generate(model, x, **kwargs):
    return model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)


X = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_full_dims_reproduce_the_dense_model(arch, impl):
    model = dense(arch, impl)
    ref, ref_tokens = logits(model, X), generate(model, X[:1]) if impl == "sdpa" else None
    family = type(model.model.layers[0].self_attn)  # LlamaAttention, ...
    for layer in range(3):
        new = compress_layer(model, layer)
        assert isinstance(new, LrcAttention) and isinstance(new, family) and type(new).__name__ == "LrcAttention"
    assert new.scaling == D ** -0.5 and (new.q_norm is not None) == (arch == "qwen3")
    assert torch.allclose(logits(model, X), ref, atol=1e-5, rtol=0)
    if impl == "sdpa":
        assert torch.equal(generate(model, X[:1]), ref_tokens)
    else:  # transformers finds the attention modules by class: LrcAttention is also the base's class
        with torch.no_grad():
            out = model(X, output_attentions=True)
        assert len(out.attentions) == 3 and out.attentions[0].shape == (2, HEADS, 11, 11)


def test_v_bias_folded_into_a_new_o_bias():
    model = dense("qwen2")
    ref = logits(model, X)
    assert model.model.layers[0].self_attn.o_proj.bias is None
    new = compress_layer(model, 0, vo_index=subset(D, 3), bias={"v": False, "o": True})
    assert new.v_proj.bias is None and new.o_proj.bias is not None
    assert new.spec()["bias"] == {"q": True, "k": True, "v": False, "o": True}
    assert torch.allclose(logits(model, X), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, impl", [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "sdpa"),
                                        ("mistral", "eager")])
def test_pair_closed_qk_index_is_exact(arch, impl):
    model = dense(arch, impl)
    reference = copy.deepcopy(model)
    indices = {0: pair_index(8, seed=10), 2: pair_index(12, seed=12)}
    for layer, index in indices.items():
        mask_layer(reference, layer, qk_index=index)
        new = compress_layer(model, layer, qk_index=index)
        assert new.q_proj.out_features == HEADS * index.shape[1] and new.k_proj.out_features == KV * index.shape[1]
        assert torch.equal(new.rope_index, index) and new.scaling == D ** -0.5
    expected = logits(reference, X)
    assert (expected - logits(dense(arch, impl), X)).abs().max() > 1e-2  # the masks change the model
    assert torch.allclose(logits(model, X), expected, atol=1e-5, rtol=0)
    if impl == "sdpa":  # positions past the prompt, through the KV cache
        assert torch.equal(generate(model, X[:1]), generate(reference, X[:1]))


def test_non_pair_closed_qk_index_is_refused_and_not_exact():
    bad = torch.arange(8).repeat(KV, 1)  # dims 0..7: none of their RoPE partners (8..15) kept
    model, reference = dense("llama"), dense("llama")
    with pytest.raises(ValueError, match="closed under RoPE pairs"):
        LrcAttention.from_base(model.model.layers[0].self_attn, 8, D, rope_index=bad)
    with pytest.raises(ValueError, match="identity"):
        swapped = torch.tensor([1, 0, *range(2, 8)])  # pair-closed, but a permutation at full size
        LrcAttention.from_base(model.model.layers[0].self_attn, D, D, rope_index=torch.cat([swapped, swapped + 8])
                               .repeat(KV, 1))
    mask_layer(reference, 0, qk_index=bad)
    compress_layer(model, 0, force_index=bad)  # bypasses the check
    assert (logits(model, X) - logits(reference, X)).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_vo_selection_is_exact(arch):
    model = dense(arch)
    reference = copy.deepcopy(model)
    qk = None if arch == "qwen3" else pair_index(10, seed=5)
    for layer, vo in ((0, subset(10, 20)), (1, subset(5, 21))):
        mask_layer(reference, layer, qk_index=qk if layer == 0 else None, vo_index=vo)
        new = compress_layer(model, layer, qk_index=qk if layer == 0 else None, vo_index=vo)
        assert new.v_proj.out_features == KV * vo.shape[1] and new.o_proj.in_features == HEADS * vo.shape[1]
    assert torch.allclose(logits(model, X), logits(reference, X), atol=1e-5, rtol=0)


def test_kv_cache_has_the_compressed_dims():
    model = dense("llama")
    reference = copy.deepcopy(model)
    qk, vo = pair_index(8, seed=30), subset(10, 31)
    mask_layer(reference, 0, qk_index=qk, vo_index=vo)
    compress_layer(model, 0, qk_index=qk, vo_index=vo)
    with torch.no_grad():
        cache = model(X, use_cache=True).past_key_values
    assert cache.layers[0].keys.shape == (2, KV, 11, 8) and cache.layers[0].values.shape == (2, KV, 11, 10)
    assert cache.layers[1].keys.shape[-1] == D and cache.layers[1].values.shape[-1] == D
    expected = generate(reference, X[:1])
    assert torch.equal(generate(model, X[:1]), expected)
    assert torch.equal(generate(model, X[:1], cache_implementation="static"), expected)


def test_qwen3_qk_compression_is_refused_and_vo_only_works():
    base = dense("qwen3").model.layers[0].self_attn
    with pytest.raises(ValueError, match="q_norm, k_norm") as err:
        LrcAttention.from_base(base, 8, D, rope_index=pair_index(8, seed=1))
    assert "\n" not in str(err.value)
    spec = {"type": "attention", "hidden_size": 64, "num_heads": HEADS, "num_kv_heads": KV, "head_dim": D,
            "qk_dim": 8, "vo_dim": D, "bias": {"q": False, "k": False, "v": False, "o": False}}
    with pytest.raises(ValueError, match="cannot be exact"):
        build_module(spec, base=base)
    module = build_module({**spec, "qk_dim": D, "vo_dim": 6}, base=base)
    assert module.q_norm is base.q_norm and module.v_proj.out_features == KV * 6
    with pytest.raises(ValueError, match="base model's attention"):
        build_module(spec)
    with pytest.raises(ValueError, match="does not fit"):
        build_module({**spec, "head_dim": 8, "qk_dim": 8}, base=base)


# Plain transformers in a fresh process where lrc cannot be imported (as in test_checkpoint.py).
RELOAD = textwrap.dedent("""
    import sys
    sys.modules["compress"] = None
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    attn = model.get_submodule("model.layers.0.self_attn")
    with torch.no_grad():
        torch.save({"logits": model(torch.load(sys.argv[2])).logits, "rope_index": attn.rope_index}, sys.argv[3])
    print()
    print(type(attn).__name__, [c.__name__ for c in type(attn).__mro__][2])
""")


def test_checkpoint_round_trip(tmp_path):
    model = dense("qwen2")
    index = pair_index(8, seed=40)
    layers = [compress_layer(model, 0, qk_index=index, vo_index=subset(10, 41)),
              compress_layer(model, 2, vo_index=subset(6, 42), bias={"v": False, "o": True})]
    modules = {f"model.layers.{i}.self_attn": m.spec() for i, m in zip((0, 2), layers)}
    model.config.lrc = {"format_version": 2, "base_model_type": "qwen2", "base_architecture": "Qwen2ForCausalLM",
                        "modules": modules}
    expected = logits(model, X)
    out = tmp_path / "ckpt"
    save_checkpoint(model, None, out)
    saved = json.loads((out / "config.json").read_text())["lrc"]["modules"]
    assert saved == modules and saved["model.layers.0.self_attn"]["qk_dim"] == 8

    torch.save(X, tmp_path / "x.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "LrcAttention Qwen2Attention"
    remote = torch.load(tmp_path / "y.pt")
    assert torch.allclose(remote["logits"], expected, atol=1e-5, rtol=0)
    assert torch.equal(remote["rope_index"], index)

    loaded = compress.load(out)
    attn = loaded.model.layers[0].self_attn
    assert isinstance(attn, LrcAttention) and torch.equal(attn.rope_index, index) and attn.spec() == modules[
        "model.layers.0.self_attn"]
    assert torch.allclose(logits(loaded, X), expected, atol=1e-5, rtol=0)

    fresh = dense("qwen2")  # apply_structure + load_state_dict: the path a resumed compression takes
    apply_structure(fresh, modules)
    fresh.load_state_dict(model.state_dict())
    assert torch.allclose(logits(fresh, X), expected, atol=1e-5, rtol=0)

    half = compress.load(out, dtype="bfloat16")
    assert half.model.layers[0].self_attn.rope_index.dtype == torch.long
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert (logits(half, X).float() - expected).abs().max() < 0.05


def test_pickle_deepcopy_and_compressing_again():
    import pickle

    model = dense("mistral")
    first = compress_layer(model, 1, vo_index=subset(12, 50))
    expected = logits(model, X)
    for again in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(again.model.layers[1].self_attn) is type(first)
        assert torch.equal(logits(again, X), expected)
    second = LrcAttention.from_base(first, 8, 6, rope_index=pair_index(8, seed=51))
    assert type(second) is type(first) and second.sliding_window == first.sliding_window == 4096
    assert second.spec()["qk_dim"] == 8 and second.rope_index.shape == (KV, 8)


@pytest.mark.parametrize("qk, vo", [(10, 4), (4, 12)])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_unequal_head_sizes_are_exact_in_every_kernel(qk, vo, impl):
    """q/k heads of one size and v heads of another: SDPA gets the smaller zero-padded to the larger (its fused CPU
    path needs one head size; zero columns add nothing to a product), eager takes them as they are; both give the
    masked dense model's logits, also through the KV cache."""
    model = dense("llama", impl)
    reference = copy.deepcopy(model)
    mask_layer(reference, 0, qk_index=pair_index(qk, seed=1), vo_index=subset(vo, 2))
    compress_layer(model, 0, qk_index=pair_index(qk, seed=1), vo_index=subset(vo, 2))
    assert torch.allclose(logits(model, X), logits(reference, X), atol=1e-5, rtol=0)
    assert torch.equal(generate(model, X[:1]), generate(reference, X[:1]))
