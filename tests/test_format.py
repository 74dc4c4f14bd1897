"""The checkpoint format (version 2): ``model_type: "lrc"`` so that plain transformers refuses to guess instead of
building a dense base model with re-initialised factors; remote code for AutoConfig, AutoModel and
AutoModelForCausalLM; format-1 checkpoints migrated in memory; newer formats refused; module dtypes kept when a
structure is rebuilt; file modes that follow the umask."""
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

import compress
from compress import api
from compress.checkpoint.modeling_lrc import AUTO_MAP, LRC_FORMAT_VERSION, LowRankLinear, apply_structure
from compress.checkpoint.save import normalize_modes, save_checkpoint
from compress.cli import app
from compress.errors import LrcError
from compress.methods.eora.lrc_compensated import CompensatedLinear
from conftest import tiny_config, tiny_recipe

# Plain transformers in a fresh process where lrc cannot be imported: what a user of a published checkpoint sees.
PLAIN = textwrap.dedent("""
    import json, sys
    sys.modules["compress"] = None
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    d, x_path, out = sys.argv[1:4]
    res = {"refused": {}}
    for name, auto in (("AutoConfig", AutoConfig), ("AutoModel", AutoModel),
                       ("AutoModelForCausalLM", AutoModelForCausalLM)):
        try:
            obj = auto.from_pretrained(d)
            res["refused"][name] = None
        except Exception as err:
            res["refused"][name] = f"{type(err).__name__}: {err}"
    res["tokens"] = AutoTokenizer.from_pretrained(d)("the cat ran home")["input_ids"]
    cfg = AutoConfig.from_pretrained(d, trust_remote_code=True)
    res["config"] = [type(cfg).__name__, cfg.model_type, [c.__name__ for c in type(cfg).__mro__]]
    x = torch.load(x_path)
    causal = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(d, trust_remote_code=True).eval()
    res["classes"] = [type(causal).__name__, type(base).__name__,
                      type(base.get_submodule("layers.0.self_attn.q_proj")).__name__]
    causal.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    empty = AutoModel.from_config(cfg, trust_remote_code=True)  # the path vLLM's Transformers backend takes
    res["from_config"] = [type(empty).__name__, type(empty.get_submodule("layers.0.self_attn.k_proj")).__name__]
    with torch.no_grad():
        torch.save({"logits": causal(x).logits, "hidden": base(x).last_hidden_state, "again": again(x).logits},
                   out + "/y.pt")
    print()  # transformers' trust_remote_code prompt leaves stdout mid-line
    print("RESULT", json.dumps(res))
""")


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, corpus_file, tmp_path_factory):
    """A compressed tiny Llama checkpoint, its inputs, and the in-memory model's logits and last hidden state."""
    tmp = tmp_path_factory.mktemp("format")
    out = tmp / "ckpt"
    model, _ = api.compress(str(tiny_model_dir("llama")), tiny_recipe(corpus_file, param_ratio=0.5), out,
                            cache_dir=tmp / "cache", progress=False)
    x = torch.randint(0, 150, (2, 12))
    with torch.no_grad():
        expected = {"logits": model(x).logits, "hidden": model.model(x).last_hidden_state}
    return out, x, expected


@pytest.fixture(scope="module")
def plain(ckpt, tmp_path_factory):
    """Run ``PLAIN`` once on the checkpoint: its JSON summary, the tensors it computed, the re-saved directory."""
    out, x, _ = ckpt
    tmp = tmp_path_factory.mktemp("plain")
    torch.save(x, tmp / "x.pt")
    env = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(out), str(tmp / "x.pt"), str(tmp / "resaved")],
                          capture_output=True, text=True, env=env, cwd=tmp, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(result.removeprefix("RESULT ")), torch.load(tmp / "resaved" / "y.pt"), tmp / "resaved"


def test_config_names_lrc_and_the_base(ckpt):
    cfg = json.loads((ckpt[0] / "config.json").read_text())
    assert cfg["model_type"] == "lrc" and cfg["architectures"] == ["LrcForCausalLM"]
    assert cfg["auto_map"] == AUTO_MAP and set(AUTO_MAP) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert {k: v for k, v in cfg["lrc"].items() if k != "modules"} == {
        "format_version": 2, "base_model_type": "llama", "base_architecture": "LlamaForCausalLM"}
    assert LRC_FORMAT_VERSION == 2


def test_plain_transformers_refuses_without_trust_remote_code(plain, tokenizer):
    refused = plain[0]["refused"]
    for name in ("AutoConfig", "AutoModel", "AutoModelForCausalLM"):
        assert refused[name] is not None, f"{name} loaded an lrc checkpoint without trust_remote_code"
        assert refused[name].startswith("ValueError: ") and "trust_remote_code=True" in refused[name], refused[name]
    assert plain[0]["tokens"] == tokenizer("the cat ran home")["input_ids"]  # AutoTokenizer needs no remote code


def test_remote_code_loads_the_same_model(ckpt, plain):
    res, got, _ = plain
    _, _, expected = ckpt
    assert res["config"][:2] == ["LrcConfig", "lrc"] and "LlamaConfig" in res["config"][2]
    assert res["classes"] == ["LrcForCausalLM", "LrcModel", "LowRankLinear"]
    assert res["from_config"] == ["LrcModel", "LowRankLinear"]
    assert torch.allclose(got["logits"], expected["logits"], atol=1e-5, rtol=0)
    assert torch.allclose(got["hidden"], expected["hidden"], atol=1e-5, rtol=0)
    assert torch.allclose(got["again"], expected["logits"], atol=1e-5, rtol=0)


def test_save_pretrained_of_a_loaded_model_round_trips(ckpt, plain):
    resaved = plain[2]
    cfg = json.loads((resaved / "config.json").read_text())
    assert cfg["model_type"] == "lrc" and cfg["auto_map"] == AUTO_MAP and cfg["architectures"] == ["LrcForCausalLM"]
    assert cfg["lrc"]["base_architecture"] == "LlamaForCausalLM" and cfg["lrc"]["base_model_type"] == "llama"
    assert (resaved / "modeling_lrc.py").is_file()
    with torch.no_grad():
        assert torch.allclose(compress.load(resaved)(ckpt[1]).logits, ckpt[2]["logits"], atol=1e-5, rtol=0)


def test_card_and_info_name_the_base(ckpt):
    import yaml

    from compress.publish.card import model_card

    card = model_card(ckpt[0], "me/tiny-lrc")
    assert yaml.safe_load(card.split("---\n")[1])["pipeline_tag"] == "text-generation"  # the hub cannot infer it
    assert "A low-rank compressed LlamaForCausalLM" in card
    assert 'AutoTokenizer.from_pretrained("me/tiny-lrc", trust_remote_code=True)' in card
    res = CliRunner().invoke(app, ["info", str(ckpt[0])])
    assert res.exit_code == 0 and "(LlamaForCausalLM, lrc format 2)" in " ".join(res.output.split()), res.output


def test_compensating_a_loaded_checkpoint_keeps_the_base(ckpt, tiny_model_dir, corpus_file, tmp_path):
    """compress_model rewrites config.lrc of a loaded checkpoint (its class is LrcForCausalLM); the saved checkpoint
    still names the base, and its compensated-over-lowrank modules reload with and without remote code."""
    from transformers import AutoModelForCausalLM

    calib = {"dataset": str(corpus_file), "samples": 8, "seq_len": 32}
    model, _ = api.compensate(str(tiny_model_dir("llama")), str(ckpt[0]), tmp_path / "e", rank=4, calibration=calib,
                              cache_dir=tmp_path / "c", progress=False)
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    assert cfg["model_type"] == "lrc" and cfg["architectures"] == ["LrcForCausalLM"]
    assert (cfg["lrc"]["base_model_type"], cfg["lrc"]["base_architecture"]) == ("llama", "LlamaForCausalLM")
    assert cfg["lrc"]["modules"]["model.layers.0.self_attn.k_proj"]["base"]["type"] == "lowrank"
    with torch.no_grad():
        expected = model(ckpt[1]).logits
        assert torch.allclose(compress.load(tmp_path / "e")(ckpt[1]).logits, expected, atol=1e-5, rtol=0)
        remote = AutoModelForCausalLM.from_pretrained(tmp_path / "e", trust_remote_code=True).eval()
        assert torch.allclose(remote(ckpt[1]).logits, expected, atol=1e-5, rtol=0)


def _as_format_1(directory):
    """Rewrite ``config.json`` the way lrc wrote it before format 2 (the base model type, one auto_map entry)."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    lrc = {k: v for k, v in cfg["lrc"].items() if k != "base_model_type"}
    base_type = cfg["lrc"].get("base_model_type") or cfg["model_type"]
    cfg.update(model_type=base_type, architectures=[lrc["base_architecture"]],
               auto_map={"AutoModelForCausalLM": "modeling_lrc.LrcForCausalLM"}, lrc={**lrc, "format_version": 1})
    path.write_text(json.dumps(cfg, indent=2))


def test_format_1_checkpoint_loads_and_is_migrated(ckpt, tmp_path):
    v1 = tmp_path / "v1"
    shutil.copytree(ckpt[0], v1)
    _as_format_1(v1)
    model = compress.load(v1)
    with torch.no_grad():
        assert torch.allclose(model(ckpt[1]).logits, ckpt[2]["logits"], atol=1e-5, rtol=0)
    assert model.config.model_type == "lrc"
    assert model.config.lrc["format_version"] == 2 and model.config.lrc["base_model_type"] == "llama"
    res = CliRunner().invoke(app, ["info", str(v1)])
    assert res.exit_code == 0 and "lowrank" in res.output, res.output
    assert "LlamaForCausalLM, lrc format 1, read as 2" in " ".join(res.output.split())
    from compress.models import load_model

    assert type(load_model(str(v1))[0]).__name__ == "LrcForCausalLM"
    save_checkpoint(model, None, tmp_path / "v2")  # saving a migrated model writes the current format
    cfg = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert cfg["model_type"] == "lrc" and cfg["lrc"]["format_version"] == 2 and cfg["auto_map"] == AUTO_MAP


def test_newer_format_is_refused_in_one_line(ckpt, tmp_path):
    newer = tmp_path / "v9"
    shutil.copytree(ckpt[0], newer)
    cfg = json.loads((newer / "config.json").read_text())
    cfg["lrc"]["format_version"] = 9
    (newer / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LrcError, match="format 9") as err:
        compress.load(newer)
    assert "\n" not in str(err.value)
    res = CliRunner().invoke(app, ["info", str(newer)])
    assert res.exit_code == 2 and "format 9" in res.output and len(res.output.strip().splitlines()) == 1


def test_config_survives_pickle_and_deepcopy(ckpt):
    import copy
    import pickle

    config = compress.load(ckpt[0]).config
    for clone in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config)):
        assert type(clone) is type(config) and clone.model_type == "lrc" and clone.to_dict() == config.to_dict()


@pytest.mark.parametrize("rebuild", ["compensated", "lowrank"])
def test_rebuilt_modules_keep_the_model_dtype(tokenizer, rebuild):
    """Resume rebuilds a structure over modules that are already replaced (no ``.weight`` of their own)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), dtype=torch.bfloat16)
    low = {"type": "lowrank", "in_features": 64, "out_features": 64, "rank": 8, "bias": False}
    first = {"model.layers.0.self_attn.q_proj": low}
    spec = {"compensated": {"type": "compensated", "rank": 4, "base": low}, "lowrank": low}[rebuild]
    apply_structure(model, first)
    apply_structure(model, {"model.layers.0.self_attn.q_proj": spec})
    mod = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(mod, {"compensated": CompensatedLinear, "lowrank": LowRankLinear}[rebuild])
    assert {p.dtype for p in mod.parameters()} == {torch.bfloat16}


def _modes(directory):
    return {p.relative_to(directory).as_posix(): stat.S_IMODE(p.stat().st_mode)
            for p in [directory, *directory.rglob("*")]}


def test_checkpoint_modes_follow_the_umask(ckpt, tmp_path):
    mask = os.umask(0o022)
    try:
        model = compress.load(ckpt[0])
        save_checkpoint(model, None, tmp_path / "saved")
    finally:
        os.umask(mask)
    modes = _modes(tmp_path / "saved")
    assert "model.safetensors" in modes and "modeling_lrc.py" in modes
    assert modes == {k: 0o755 if (tmp_path / "saved" / k).is_dir() else 0o644 for k in modes}
    expect = {k: (0o777 if (ckpt[0] / k).is_dir() else 0o666) & ~mask for k in _modes(ckpt[0])}
    assert _modes(ckpt[0]) == expect  # lrc compress output (temp dir renamed into place) under this process's umask


def test_normalize_modes_fixes_temp_file_modes(tmp_path):
    (tmp_path / "sub").mkdir(mode=0o700)
    for name in ("a.safetensors", "sub/b.json"):
        (tmp_path / name).write_text("x")
        os.chmod(tmp_path / name, 0o600)
    mask = os.umask(0o002)
    try:
        normalize_modes(tmp_path)
    finally:
        os.umask(mask)
    assert _modes(tmp_path) == {".": 0o775, "sub": 0o775, "a.safetensors": 0o664, "sub/b.json": 0o664}


def test_plan_on_an_lrc_checkpoint_reads_its_structure(tiny_model_dir, corpus_file, tmp_path):
    """``lrc plan CKPT`` with a compensation recipe: the checkpoint's own modules (low-rank) are planned, from the
    config alone, without remote code."""
    from compress import api
    from compress.recipe import parse_recipe

    api.compress(str(tiny_model_dir("llama")), tiny_recipe(corpus_file, param_ratio=0.5), tmp_path / "ck",
                 cache_dir=tmp_path / "c", progress=False)
    rows = api.plan(str(tmp_path / "ck"), parse_recipe({"stages": [{"method": "eora", "rank": 4}]}))
    lowrank = [r for r in rows if r.base_params is not None]
    assert rows and all(r.compensation for r in rows) and lowrank
    assert all(r.params_after == r.params_before + 4 * (r.out_features + r.in_features) for r in rows)
