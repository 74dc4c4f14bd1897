"""Checkpoint round trip: reload with plain transformers (lrc not importable) and with compress.load."""
import json
import os
import subprocess
import sys

import pytest
import torch

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
