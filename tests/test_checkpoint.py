"""Checkpoint round trip: reload with plain transformers (lrc not importable) and with compress.load."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import compress
from compress import api
from conftest import RELOAD_LOGITS, tiny_recipe

RELOAD = RELOAD_LOGITS + 'print(type(model.get_submodule("model.layers.0.self_attn.q_proj")).__name__)\n'


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_round_trip_in_fresh_process_and_with_compress_load(arch, tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "ckpt"
    model, report = api.compress(str(tiny_model_dir(arch)), tiny_recipe(corpus_file, param_ratio=0.5), out,
                                 cache_dir=tmp_path / "cache", progress=False)
    x = torch.randint(0, 150, (2, 12))
    with torch.no_grad():
        expected = model(x).logits
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("LowRankLinear")
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-5, rtol=0)

    loaded = compress.load(out)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, expected, atol=1e-5, rtol=0)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "lrc" and cfg["lrc"]["base_model_type"] == arch
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_lrc.LrcForCausalLM"
    spec = cfg["lrc"]["modules"]["model.layers.0.self_attn.k_proj"]
    assert spec == {"type": "lowrank", "in_features": 64, "out_features": 32, "rank": 10, "bias": arch == "qwen2"}
    for name in ("model.safetensors", "modeling_lrc.py", "lrc_recipe.yaml", "lrc_report.json", "lrc_modules.csv",
                 "tokenizer.json"):
        assert (out / name).is_file(), name
    rows = (out / "lrc_modules.csv").read_text().splitlines()
    assert rows[0].startswith("name,stage,method,type") and len(rows) == 1 + 21
    rep = json.loads((out / "lrc_report.json").read_text())
    assert rep["targeted"]["params_after"] == sum(r["params_after"] for r in rep["modules"])
    assert "KEPT" in rep["ratio_definition"] or "after / before" in rep["ratio_definition"]


def test_saved_checkpoint_has_fewer_parameters(tiny_model_dir, corpus_file, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "ckpt"
    _, report = api.compress(str(tiny_model_dir("mistral")), tiny_recipe(corpus_file, param_ratio=0.5), out,
                          cache_dir=tmp_path / "cache", progress=False)
    with safe_open(out / "model.safetensors", "pt") as f:
        stored = sum(f.get_tensor(k).numel() for k in f.keys())
    assert stored == report["model_params"]["after"]["total"]
    assert report["model_params"]["after"]["total"] < report["model_params"]["before"]["total"]


def test_spec_missing_a_field_is_named_not_called_unknown():
    """A known module type whose spec lacks a field its builder reads says which field (it used to be reported as
    an unknown module type); an unknown type is still reported as one."""
    from compress.checkpoint.modeling_lrc import build_module

    with pytest.raises(ValueError, match="'lowrank' module spec has no 'rank' field"):
        build_module({"type": "lowrank", "in_features": 8, "out_features": 8})
    with pytest.raises(ValueError, match="unknown module type 'lowrnak'"):
        build_module({"type": "lowrnak", "in_features": 8, "out_features": 8, "rank": 2})
    assert build_module({"type": "lowrank", "in_features": 8, "out_features": 6, "rank": 2}).rank == 2


def test_every_tokenizer_example_passes_the_remote_code_flag():
    """transformers reads config.json (model type ``lrc``, remote ``AutoConfig``) before it picks a tokenizer, and
    asks in a terminal whether to run the custom code: every example that loads a checkpoint's tokenizer, in the
    README and in the model card lrc writes, passes ``trust_remote_code=True``."""
    import re
    from pathlib import Path

    from compress.publish import card as card_module

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    card = Path(card_module.__file__).read_text()  # the card's example lines, as the code writes them
    for text in (readme, card):
        calls = re.findall(r"AutoTokenizer\.from_pretrained\(([^)]*)\)", text)
        assert calls and all("trust_remote_code=True" in c for c in calls), calls


CORE_REMOTE = {"modeling_lrc.py", "lrc_types.py", "lrc_layers.py", "lrc_fast.py"}
# the checkpoint's remote code, loaded without lrc: its files and module types, and those of a save_pretrained copy
RELOAD_TYPES = RELOAD_LOGITS + textwrap.dedent("""
    import json, pathlib
    model.save_pretrained(sys.argv[4])
    kinds = {n: type(model.get_submodule(n)).__name__ for n in sys.argv[5].split(",")}
    copied = sorted(p.name for p in pathlib.Path(sys.argv[4]).glob("*.py"))
    types = sorted(sys.modules[type(model).__module__].MODULE_TYPES)
    print("RESULT", json.dumps({"kinds": kinds, "copied": copied, "types": types}))
""")


def _quantized(W, bits):
    from compress.quant import QuantLinear, QuantSpec, rtn

    q = rtn(W.double(), QuantSpec(bits=bits, group_size=32))
    m = QuantLinear(W.shape[1], W.shape[0], bits, 32, dtype=torch.float32)
    for k, v in q.to_packed().items():
        getattr(m, k).copy_(v)
    return m


def _quantized_table(W):
    from compress.quant import QuantEmbedding, QuantSpec, rtn

    q = rtn(W.detach().double(), QuantSpec(bits=8, group_size=None, symmetric=True))
    m = QuantEmbedding(W.shape[0], W.shape[1], 8, None, True, dtype=torch.float32)
    for k, v in q.to_packed().items():
        getattr(m, k).copy_(v)
    return m


def _every_module_type(model):
    """``model`` (the tiny Llama) with a module of every registered type that a checkpoint can hold: MoDeGPT's
    attention, a low-rank Linear, a dictionary owner wrapped by EoRA's residual, a sharer of its dictionary, a dense
    Linear, a quantized Linear, quantized embeddings and the head tied to them; returns the replaced names."""
    from compress.checkpoint.modeling_lrc import LowRankLinear
    from compress.methods.cospadi.lrc_dictionary import DictLinear
    from compress.methods.eora.lrc_compensated import CompensatedLinear
    from compress.methods.modegpt.lrc_attention import LrcAttention
    from compress.quant import QuantTiedHead

    g = torch.Generator().manual_seed(0)
    attention = LrcAttention.from_base(model.model.layers[0].self_attn, qk_dim=8, vo_dim=12)
    index = torch.stack([torch.randperm(24, generator=g)[:10] for _ in range(64)])
    owner = DictLinear.from_sparse(torch.randn(24, 96, generator=g), index, torch.randn(64, 10, generator=g))
    sharer = DictLinear.from_sparse(owner, index.flip(1), torch.randn(64, 10, generator=g),
                                    torch.randn(64, generator=g), shared_from="model.layers.0.mlp.down_proj")
    new = {"model.layers.0.self_attn": attention, "model.layers.0.mlp.gate_proj": LowRankLinear(64, 96, 8),
           "model.layers.0.mlp.down_proj": CompensatedLinear(owner, 3), "model.layers.1.mlp.down_proj": sharer,
           "model.layers.1.mlp.up_proj": nn.Linear(64, 96, bias=False),
           "model.layers.1.self_attn.q_proj": _quantized(torch.randn(64, 64, generator=g), bits=4),
           "model.embed_tokens": _quantized_table(model.model.embed_tokens.weight),
           "lm_head": QuantTiedHead("model.embed_tokens", 64, model.config.vocab_size)}
    for name, module in new.items():
        for p in module.parameters():
            if p.is_floating_point() and p is not owner.dictionary.weight and p is not owner.values:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.set_submodule(name, module)
    model.lm_head.lrc_link(model.get_submodule)
    return list(new)


def test_remote_code_is_the_registered_types_used_and_loads_without_lrc(tiny_model_dir, tmp_path):
    """The checkpoint's remote code is the core files plus the file of each module type its specs use (the registry's
    ``remote``), no more; with a module of every type it loads in a process without lrc (and from a
    ``save_pretrained`` copy, which takes the same files along) with the same logits."""
    from transformers import AutoModelForCausalLM

    from compress.checkpoint.module_types import TYPES, module_spec
    from compress.checkpoint.save import remote_code, save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    names = _every_module_type(model)
    modules = {n: module_spec(model.get_submodule(n)) for n in names}
    model.config.lrc = {"modules": modules}
    assert {t for spec in modules.values() for t in (spec["type"], spec.get("base", {}).get("type"))} - {None} == \
        {t.name for t in TYPES.values() if t.build is not None}  # every type a checkpoint can hold is here
    out = tmp_path / "ckpt"
    save_checkpoint(model, None, out)
    expected_files = CORE_REMOTE | {TYPES[t].remote.name for t in ("attention", "compensated", "dictionary",
                                                                   "quant")}
    assert expected_files == CORE_REMOTE | {"lrc_attention.py", "lrc_compensated.py", "lrc_dictionary.py",
                                            "lrc_quant.py"}
    assert {p.name for p in out.glob("*.py")} == set(remote_code(modules)) == expected_files

    x = torch.randint(0, 150, (2, 12))
    with torch.no_grad():
        logits = model(x).logits
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    args = [str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"), str(tmp_path / "copy"), ",".join(names)]
    proc = subprocess.run([sys.executable, "-c", RELOAD_TYPES, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT ")).split(" ", 1)[1])
    assert res["kinds"] == {n: type(model.get_submodule(n)).__name__ for n in names}
    assert res["copied"] == sorted(expected_files)
    assert res["types"] == sorted(t.name for t in TYPES.values() if t.build is not None)
    assert torch.allclose(torch.load(tmp_path / "y.pt"), logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.allclose(compress.load(out)(x).logits, logits, atol=1e-5, rtol=0)

    # a checkpoint of low-rank modules only carries the core files, its loader only the core types
    lowrank = {n: s for n, s in modules.items() if s["type"] == "lowrank"}
    files = remote_code(lowrank)
    assert set(files) == CORE_REMOTE and '"lowrank": build_lowrank' in files["lrc_types.py"]
    assert "compensated" not in files["lrc_types.py"] and "attention" not in files["lrc_types.py"]
