"""The execution fast path (``compress/checkpoint/lrc_fast.py``): fused and unfused forwards agree for the q/k/v and
gate/up groups of tiny Llama/Qwen2/Mistral models compressed by lrc, in eval and train modes, with gradients; the
shared-input cache never hands out a stale product; greedy decoding with a KV cache gives the same tokens; the fused
parameters still save, copy, convert and reload (also in a fresh process without lrc)."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import compress
from compress import api
from compress.checkpoint import lrc_fast
from compress.checkpoint.lrc_fast import SharedInput
from compress.checkpoint.lrc_layers import LowRankLinear
from compress.checkpoint.modeling_lrc import set_fast_path
from compress.checkpoint.save import save_checkpoint
from conftest import RELOAD_LOGITS, tiny_recipe

ARCHS = ["llama", "qwen2", "mistral"]
X = torch.randint(3, 150, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def fuse_small_inputs(monkeypatch):
    """Fuse from one token on (lrc fuses from 64: decoding steps gain nothing on a CPU), so tiny inputs exercise it."""
    monkeypatch.setattr(lrc_fast, "FUSE_MIN_ROWS", 1)


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, corpus_file, tmp_path_factory):
    made = {}

    def make(arch: str):
        if arch not in made:
            out = tmp_path_factory.mktemp(f"fused-{arch}") / "ckpt"
            api.compress(str(tiny_model_dir(arch)), tiny_recipe(corpus_file, param_ratio=0.5), out,
                         cache_dir=out.parent / "cache", progress=False)
            made[arch] = out
        return made[arch]

    return make


def groups(model) -> list[list[str]]:
    """The fusion groups of ``model`` by member name, in order of first member."""
    names = {id(m): n for n, m in model.named_modules()}
    found = {id(m._group): m._group for m in model.modules() if isinstance(m, LowRankLinear) and m._group is not None}
    return sorted([names[id(m)].rsplit(".", 2)[-2:] for m in g.members] for g in found.values())


def logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


def mm_calls(model, x=X) -> int:
    from torch.profiler import profile

    with torch.no_grad(), profile() as prof:
        model(x)
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_and_unfused_agree_in_eval_and_train_modes(arch, checkpoints):
    model = compress.load(checkpoints(arch))
    plain = set_fast_path(compress.load(checkpoints(arch)), fast=False, layout=False)
    expected = logits(plain)
    assert torch.allclose(logits(model), expected, atol=1e-5, rtol=0)  # the first forward finds the groups
    layers = model.config.num_hidden_layers
    assert len(groups(model)) == 2 * layers
    for g in groups(model):
        assert [n for _, n in g] in (["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]), g
    assert mm_calls(model) == mm_calls(plain) - 3 * layers  # 3 first factors -> 1, 2 -> 1 per layer
    lrc_fast.FUSE_MIN_ROWS = X.numel() + 1
    assert mm_calls(model) == mm_calls(plain)  # fewer tokens than FUSE_MIN_ROWS: every member alone
    lrc_fast.FUSE_MIN_ROWS = 1
    assert torch.allclose(logits(model), expected, atol=1e-5, rtol=0)
    second = model.model.layers[0].mlp.gate_proj.second.weight  # out > rank: stored column-major
    assert not second.is_contiguous() and second.t().is_contiguous()

    model.train(), plain.train()  # no dropout in these models: train mode changes no value
    assert torch.allclose(logits(model), expected, atol=1e-5, rtol=0)
    loss, ref = model(X).logits.square().mean(), plain(X).logits.square().mean()  # autograd: every member alone
    loss.backward(), ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    for name in ("q_proj", "k_proj", "v_proj"):
        for factor in ("first", "second"):
            got = getattr(getattr(model.model.layers[1].self_attn, name), factor).weight.grad
            want = getattr(getattr(plain.model.layers[1].self_attn, name), factor).weight.grad
            assert got is not None and torch.allclose(got, want, atol=1e-6, rtol=1e-4), (name, factor)


def _group_of(*members: LowRankLinear) -> SharedInput:
    x = torch.randn(3, members[0].in_features)
    with torch.no_grad():
        for m in members:  # one forward with the same tensor links them (fusion is on in loaded checkpoints)
            m.fuse = True
            m(x)
    assert members[0]._group is not None and members[0]._group.members == list(members)
    return members[0]._group


def test_the_cache_is_never_stale():
    torch.manual_seed(0)
    a, b, c = LowRankLinear(8, 6, 3, bias=True), LowRankLinear(8, 5, 2), LowRankLinear(8, 9, 4)
    group = _group_of(a, b, c)
    reference = {m: (lambda t, m=m: m.second(m.first(t))) for m in (a, b, c)}
    x, y = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    with torch.no_grad():
        assert torch.allclose(a(x), reference[a](x), atol=1e-6) and group.entry is not None  # a computed for all
        x.add_(1.0)  # the same tensor object, written in place: b must not take the product of the old values
        assert torch.allclose(b(x), reference[b](x), atol=1e-6)
        assert torch.allclose(c(y), reference[c](y), atol=1e-6)  # another input
        a(x), b(x), c(x)
        assert group.entry is None  # released after the last member
        a(x)
        assert torch.allclose(a(x), reference[a](x), atol=1e-6)  # the same member twice: recomputed, not a slice
        with torch.no_grad():
            a.first.weight.mul_(2)  # an in-place weight update lands in the fused buffer (the weight is a view)
        assert torch.allclose(b(x), reference[b](x), atol=1e-6) and torch.allclose(a(x), reference[a](x), atol=1e-6)
        b.first.weight = torch.nn.Parameter(torch.randn(2, 8))  # a replaced parameter: the buffer is rebuilt
        assert torch.allclose(a(x), reference[a](x), atol=1e-6) and torch.allclose(b(x), reference[b](x), atol=1e-6)
        assert b.first.weight.data_ptr() == a.first.weight.data_ptr() + 3 * 8 * 4
    with torch.inference_mode():  # inference tensors have no version counter: every member alone
        z = torch.randn(2, 8)
        assert a._group.first(0, z) is None and torch.allclose(b(z), reference[b](z), atol=1e-6)


def test_kv_cache_decoding_gives_the_same_tokens(checkpoints):
    model = compress.load(checkpoints("llama"))
    plain = set_fast_path(compress.load(checkpoints("llama")), fast=False, layout=False)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(X))
    fused = model.generate(X, **kwargs)
    assert groups(model) and torch.equal(fused, plain.generate(X, **kwargs))
    assert torch.equal(model.generate(X, **kwargs), fused)


def test_fused_parameters_save_copy_convert_and_reload(checkpoints, tmp_path):
    model = compress.load(checkpoints("qwen2"))
    expected = logits(model)
    logits(model)  # fused: the q/k/v first factors are views of one buffer
    q, k = model.model.layers[0].self_attn.q_proj.first.weight, model.model.layers[0].self_attn.k_proj.first.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()

    copied = copy.deepcopy(model)  # a copy's parameters and groups are its own
    assert torch.allclose(logits(copied), expected, atol=1e-5, rtol=0)
    assert copied.model.layers[0].self_attn.q_proj._group is not model.model.layers[0].self_attn.q_proj._group
    assert copied.model.layers[0].self_attn.q_proj.first.weight.data_ptr() != q.data_ptr()

    model.double()  # conversion gives each parameter its own storage: the buffer is rebuilt
    assert torch.allclose(logits(model).float(), expected, atol=1e-5, rtol=0)
    model.float()

    save_checkpoint(model, None, tmp_path / "again")  # views of one buffer save as separate tensors
    reloaded = compress.load(tmp_path / "again")
    assert torch.allclose(logits(reloaded), expected, atol=1e-5, rtol=0)

    torch.save(X, tmp_path / "x.pt")  # a fresh process without lrc: the checkpoint's own lrc_fast.py fuses
    script = RELOAD_LOGITS + ("with torch.no_grad():\n    model(x)\n"
                              "print(sum(getattr(m, '_group', None) is not None for m in model.modules()))\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "LRC_FUSE_MIN_ROWS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "again"), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) == 5 * model.config.num_hidden_layers  # q, k, v, gate, up in groups
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-5, rtol=0)


def test_lrc_attention_fuses_qkv_exactly():
    from test_lrc_attention import X as TOKENS
    from test_lrc_attention import compress_layer, dense, pair_index, subset

    model = dense("qwen2")  # q/k/v biases
    attn = compress_layer(model, 1, pair_index(8, 0), subset(12, 1))
    set_fast_path(model)  # as a checkpoint loads
    fused = logits(model, TOKENS)
    assert attn._fused is not None and attn._fused.fused is not None  # one buffer, biases included
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    set_fast_path(model, fast=False)
    assert torch.allclose(logits(model, TOKENS), fused, atol=1e-5, rtol=0)
