"""CoSpaDi's ``DictLinear`` (Makhov et al., arXiv 2509.22075): a dense dictionary and a row-sparse coefficient map
stored as values + packed bitmask; shared dictionaries; the checkpoint round trip in a fresh process."""
import copy
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import compress
from compress.checkpoint.modeling_lrc import build_module
from compress.checkpoint.module_types import module_spec, unit_params, unit_weights
from compress.methods.cospadi.lrc_dictionary import DictLinear
from compress.methods.eora.lrc_compensated import CompensatedLinear
from conftest import RELOAD_LOGITS

FACTORED = (32, 32, 8, 4)  # in, out, atoms, nnz: 8 * (32 + 32) < 32 * 32
DENSE = (16, 12, 16, 5)  # 16 * (16 + 12) >= 12 * 16


def random_sparse(n: int, m: int, k: int, s: int, dtype=torch.float32, seed: int = 0):
    """A random dictionary (k x n), unsorted support (m x s), values and bias, and the dense C (m x k) they make."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(k, n, generator=g, dtype=dtype)
    index = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(m)])
    values = torch.randn(m, s, generator=g, dtype=dtype)
    bias = torch.randn(m, generator=g, dtype=dtype)
    dense = torch.zeros(m, k, dtype=dtype).scatter(1, index, values)
    return dictionary, index, values, bias, dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, path", [(FACTORED, "factored"), (DENSE, "dense")])
def test_from_sparse_matches_the_dense_product(shape, path, dtype):
    n, m, k, s = shape
    dictionary, index, values, bias, dense = random_sparse(*shape, dtype=dtype)
    mod = DictLinear.from_sparse(dictionary, index, values, bias).eval()
    assert (mod.in_features, mod.out_features, mod.atoms, mod.nnz, mod.shared_from) == (n, m, k, s, None)
    assert mod.values.dtype == dtype and mod.mask.dtype == torch.uint8 and mod.mask.shape == (m, (k + 7) // 8)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 0}
    assert torch.allclose(mod.weight_approx, dense @ dictionary, **tol)
    assert torch.equal(mod.coefficients(), dense)
    assert ((mod.coefficients() != 0).sum(1) == s).all()
    assert torch.equal(mod.support(), index.sort(dim=1).values)
    x = torch.randn(3, 5, n, dtype=dtype)
    with torch.no_grad():
        y = mod(x)
    assert mod.exec_path == path and mod._plan[1] == path
    assert mod._plan[2].shape == ((m, k) if path == "factored" else (m, n))  # C, or W~ = C D^T
    assert torch.allclose(y, x @ (dense @ dictionary).T + bias, **tol)
    with torch.no_grad():
        plan = mod._plan
        assert torch.equal(mod(x), y) and mod._plan is plan  # cached, not rebuilt


def test_mask_is_packed_little_endian_per_byte():
    index = torch.tensor([[0, 9], [7, 8], [3, 10]])
    mod = DictLinear.from_sparse(torch.randn(11, 4), index, torch.ones(3, 2), None)
    assert mod.mask.tolist() == [[1, 2], [128, 1], [8, 4]]
    assert mod.support().tolist() == index.tolist()


def test_bad_supports_are_refused():
    dictionary = torch.randn(6, 4)
    with pytest.raises(ValueError, match="distinct"):
        DictLinear.from_sparse(dictionary, torch.tensor([[1, 1]]), torch.ones(1, 2), None)
    with pytest.raises(ValueError, match="distinct"):
        DictLinear.from_sparse(dictionary, torch.tensor([[1, 6]]), torch.ones(1, 2), None)
    with pytest.raises(ValueError, match="out x nnz"):
        DictLinear.from_sparse(dictionary, torch.tensor([[1, 2]]), torch.ones(1, 3), None)
    mod = DictLinear.from_sparse(dictionary, torch.tensor([[1, 2]]), torch.ones(1, 2), None)
    mod.mask[0, 0] = 0b111  # three atoms set for nnz = 2
    with pytest.raises(ValueError, match="row 0 sets 3"):
        mod.support()
    mod.mask[0, 0] = 0b1000001  # atom 6 is past the last one
    with pytest.raises(ValueError, match="exactly 2 of the 6"):
        mod.support()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_cache_follows_in_place_updates_and_load_state_dict(dtype):
    dictionary, index, values, bias, dense = random_sparse(*FACTORED, dtype=dtype)
    mod = DictLinear.from_sparse(dictionary, index, values, bias).eval()
    x = torch.randn(4, FACTORED[0], dtype=dtype)
    with torch.no_grad():
        before = mod(x)
        mod.values.mul_(2)
        assert torch.allclose(mod(x) - bias, 2 * (before - bias), atol=1e-5)
        mod.dictionary.weight.mul_(-1)
        assert torch.allclose(mod(x) - bias, -2 * (before - bias), atol=1e-5)
    other = DictLinear.from_sparse(*random_sparse(*FACTORED, dtype=dtype, seed=1)[:4]).eval()
    mod.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(mod.support(), other.support())
        assert torch.allclose(mod(x), other(x), atol=1e-6)
        mod.to(torch.float16 if dtype == torch.float32 else torch.float32)
        assert mod._plan is None  # .to() drops the cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [FACTORED, DENSE])
def test_gradients_reach_values_and_the_dictionary(shape, dtype):
    dictionary, index, values, bias, _ = random_sparse(*shape, dtype=dtype)
    mod = DictLinear.from_sparse(dictionary, index, values, bias).train()
    order = index.argsort(dim=1)
    ref_values = values.gather(1, order).requires_grad_()
    ref_dictionary = dictionary.clone().requires_grad_()
    x = torch.randn(6, shape[0], dtype=dtype, generator=torch.Generator().manual_seed(0))
    mod(x).pow(2).sum().backward()
    coeff = torch.zeros(shape[1], shape[2], dtype=dtype).scatter(1, index.gather(1, order), ref_values)
    (x @ (coeff @ ref_dictionary).T + bias).pow(2).sum().backward()
    assert mod._plan is None  # no cache while training
    for got, ref in ((mod.values.grad, ref_values.grad), (mod.dictionary.weight.grad, ref_dictionary.grad)):
        # the two sides sum the same products in different orders: fp32 round-off scales with the largest gradient
        # (entries reach 1e3 here), so the tolerance is relative to it, not absolute
        scale = float(ref.abs().max())
        tol = {"atol": 1e-6 * scale, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12 * scale, "rtol": 0}
        assert torch.allclose(got, ref, **tol)
    assert mod.bias.grad is not None


def test_storage_bytes_is_what_the_state_dict_holds():
    dictionary, index, values, bias, _ = random_sparse(*FACTORED)
    owner = DictLinear.from_sparse(dictionary, index, values, bias)
    sharer = DictLinear.from_sparse(owner, index, values, None, shared_from="owner")
    for mod in (owner, sharer):
        assert mod.storage_bytes() == sum(t.numel() * t.element_size() for t in mod.state_dict().values())
    assert set(owner.state_dict()) == {"dictionary.weight", "values", "mask", "bias"}
    assert set(sharer.state_dict()) == {"values", "mask"}
    n, m, k, s = FACTORED
    assert owner.exec_path == "factored"  # the count is what the forward executes: C densified, k(n + m)
    assert unit_weights(owner) == unit_weights(sharer) == k * (n + m)
    assert unit_params(sharer) == m * s and unit_params(owner) == k * n + m * s + m


def test_shared_dictionary_links_without_copies():
    dictionary, index, values, bias, dense = random_sparse(*FACTORED)
    owner = DictLinear.from_sparse(dictionary, index, values, bias).eval()
    unlinked = DictLinear(FACTORED[0], FACTORED[1], FACTORED[2], FACTORED[3], shared_from="model.layers.0.q")
    with pytest.raises(RuntimeError, match="model.layers.0.q"):
        unlinked.dict_weight
    with pytest.raises(ValueError, match="cannot link"):
        unlinked.link(DictLinear.from_sparse(torch.randn(9, FACTORED[0]), index, values, None))
    _, index2, values2, _, dense2 = random_sparse(*FACTORED, seed=3)
    sharer = DictLinear.from_sparse(owner, index2, values2, None, shared_from="model.layers.0.q").eval()
    assert "shared_from='model.layers.0.q'" in repr(sharer) and "dictionary" not in dict(sharer.named_modules())
    assert [n for n, _ in sharer.named_parameters()] == ["values"]
    x = torch.randn(4, FACTORED[0])
    with torch.no_grad():
        assert torch.allclose(sharer(x), x @ (dense2 @ dictionary).T, atol=1e-5)

    block = nn.ModuleDict({"q": sharer})  # a block without the owner: the copy keeps using the original dictionary
    copied = copy.deepcopy(block)
    assert copied.q.dict_weight is owner.dictionary.weight
    assert copied.q.dict_weight.data_ptr() == owner.dictionary.weight.data_ptr()
    assert copied.q.values.data_ptr() != sharer.values.data_ptr() and copied.q._plan is None
    assert not any("dictionary" in key for key in copied.state_dict())
    copied.to(torch.float64)
    assert owner.dictionary.weight.dtype == torch.float32

    for order in (("owner", "sharer"), ("sharer", "owner")):  # both in one deepcopy: relinked to the copied owner
        both = nn.ModuleDict({name: {"owner": owner, "sharer": sharer}[name] for name in order})
        twin = copy.deepcopy(both)
        assert twin["sharer"].dict_weight is twin["owner"].dictionary.weight
        assert twin["owner"].dictionary.weight.data_ptr() != owner.dictionary.weight.data_ptr()
        again = pickle.loads(pickle.dumps(both))  # pickles with a cached plan (weak references) and keeps the link
        assert again["sharer"].dict_weight is again["owner"].dictionary.weight

    sharer.train()
    sharer(x).sum().backward()
    assert owner.dictionary.weight.grad is not None and sharer.values.grad is not None


def test_specs_build_and_link(tokenizer):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from compress.checkpoint.modeling_lrc import apply_structure

    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)))
    owner = {"type": "dictionary", "in_features": 64, "out_features": 64, "atoms": 24, "nnz": 12, "bias": False}
    sharer = {**owner, "shared_from": "model.layers.0.self_attn.q_proj"}
    modules = {"model.layers.1.self_attn.q_proj": sharer, "model.layers.0.self_attn.q_proj": owner,
               "model.layers.2.self_attn.q_proj": {"type": "compensated", "in_features": 64, "out_features": 64,
                                                   "rank": 2, "base": sharer}}
    apply_structure(model, modules)
    built = {name: model.get_submodule(name) for name in modules}
    assert {name: module_spec(mod) for name, mod in built.items()} == modules
    first = built["model.layers.0.self_attn.q_proj"].dictionary.weight
    assert built["model.layers.1.self_attn.q_proj"].dict_weight is first
    assert built["model.layers.2.self_attn.q_proj"].base.dict_weight is first
    assert isinstance(build_module(sharer), DictLinear)
    with pytest.raises(ValueError, match="no dictionary module"):
        apply_structure(model, {"model.layers.2.mlp.up_proj": {**sharer, "shared_from": "model.layers.0.mlp.up_proj"}})


RELOAD = RELOAD_LOGITS + textwrap.dedent("""
    q0, q1 = (model.get_submodule(f"model.layers.{i}.self_attn.q_proj") for i in (0, 1))
    down2 = model.get_submodule("model.layers.2.mlp.down_proj").base
    owner = model.get_submodule("model.layers.0.mlp.down_proj").base
    print(type(q1).__name__, q1.dict_weight is q0.dictionary.weight, down2.dict_weight is owner.dictionary.weight,
          q0.exec_path, owner.exec_path)
""")


def _dict_linear(n, m, k, s, seed, owner=None, shared_from=None, bias=False):
    dictionary, index, values, b, _ = random_sparse(n, m, k, s, seed=seed)
    return DictLinear.from_sparse(owner or dictionary, index, values, b if bias else None, shared_from=shared_from)


def _compensated(base, rank, seed):
    g = torch.Generator().manual_seed(seed)
    mod = CompensatedLinear(base, rank)
    with torch.no_grad():
        mod.lora_A.weight.copy_(torch.randn(rank, base.in_features, generator=g) * 0.1)
        mod.lora_B.weight.copy_(torch.randn(base.out_features, rank, generator=g) * 0.1)
    return mod


def test_round_trip_in_fresh_process_and_with_compress_load(tiny_model_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from compress.checkpoint import load_config
    from compress.checkpoint.modeling_lrc import LrcModel
    from compress.checkpoint.save import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    q0 = _dict_linear(64, 64, 24, 12, seed=0)  # factored: 24 * 128 < 64 * 64
    down0 = _dict_linear(96, 64, 48, 20, seed=2, bias=True)  # dense: 48 * 160 >= 64 * 96
    replaced = {
        "model.layers.0.self_attn.q_proj": q0,
        "model.layers.1.self_attn.q_proj": _dict_linear(64, 64, 24, 12, 1, q0, "model.layers.0.self_attn.q_proj"),
        "model.layers.0.mlp.down_proj": _compensated(down0, 4, seed=3),
        "model.layers.2.mlp.down_proj": _compensated(
            _dict_linear(96, 64, 48, 20, 4, down0, "model.layers.0.mlp.down_proj"), 3, seed=5),
    }
    for name, mod in replaced.items():
        model.set_submodule(name, mod)
    model.config.lrc = {"modules": {name: module_spec(mod) for name, mod in replaced.items()}}
    out = tmp_path / "ckpt"
    save_checkpoint(model, None, out)
    x = torch.randint(0, 150, (2, 12))
    with torch.no_grad():
        expected = model(x).logits
        hidden = model.model(x).last_hidden_state
    torch.save(x, tmp_path / "x.pt")

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-5:] == ["DictLinear", "True", "True", "factored", "dense"]
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-5, rtol=0)

    loaded = compress.load(out)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, expected, atol=1e-5, rtol=0)
    decoder = LrcModel.from_pretrained(str(out), config=load_config(out)).eval()  # names cut by "model."
    with torch.no_grad():
        assert torch.allclose(decoder(x).last_hidden_state, hidden, atol=1e-5, rtol=0)

    with safe_open(out / "model.safetensors", "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    assert {k: v for k, v in shapes.items() if k.startswith("model.layers.0.self_attn.q_proj.")} == {
        "model.layers.0.self_attn.q_proj.dictionary.weight": (24, 64),
        "model.layers.0.self_attn.q_proj.values": (64, 12), "model.layers.0.self_attn.q_proj.mask": (64, 3)}
    assert {k: v for k, v in shapes.items() if k.startswith("model.layers.1.self_attn.q_proj.")} == {
        "model.layers.1.self_attn.q_proj.values": (64, 12), "model.layers.1.self_attn.q_proj.mask": (64, 3)}
    down = {k: v for k, v in shapes.items() if k.startswith("model.layers.2.mlp.down_proj.")}
    assert down == {"model.layers.2.mlp.down_proj.base.values": (64, 20), "model.layers.2.mlp.down_proj.base.mask":
                    (64, 6), "model.layers.2.mlp.down_proj.lora_A.weight": (3, 96),
                    "model.layers.2.mlp.down_proj.lora_B.weight": (64, 3)}
    assert shapes["model.layers.0.mlp.down_proj.base.dictionary.weight"] == (48, 96)
    assert not any(shape in {(64, 24), (64, 48)} for shape in shapes.values())  # no dense C (out x atoms)
