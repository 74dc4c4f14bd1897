"""``lrc finetune`` (compress/finetune/): only the chosen parameters train (the frozen ones stay bit for bit and get
no optimizer state), the loss falls on a tiny model, a run resumed after a crash ends on the same weights as an
uninterrupted one, the result reloads, and bad data is a one-line error."""
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import compress
from compress import api
from compress.cli import app
from compress.errors import LrcError
from compress.finetune import FinetuneConfig, finetune
from compress.finetune.loop import STATE_FILE
from compress.finetune.params import select
from conftest import tiny_recipe


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "svd-llm-50"
    api.compress(str(tiny_model_dir("llama")), tiny_recipe(corpus_file, param_ratio=0.5), out,
                 cache_dir=out.parent / "cache", progress=False, return_model=False)
    return out


def _cfg(corpus_file, **kw):
    base = dict(data=str(corpus_file), steps=6, lr=1e-3, warmup=1, batch_size=4, seq_len=32, holdout=4,
                eval_every=3, save_every=2)
    return FinetuneConfig(**{**base, **kw})


def test_only_lrc_modules_train(checkpoint, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    report = finetune(str(checkpoint), _cfg(corpus_file), tmp_path / "out", device="cpu")
    before, after = load_file(checkpoint / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    trained = set(select(compress.load(checkpoint), "lrc"))
    assert trained and all(".first." in n or ".second." in n for n in trained)
    assert before.keys() == after.keys()
    for name in before:
        if name in trained:
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name  # frozen: bit for bit
    ft = report["finetune"]
    assert ft["trained_params"] == sum(before[n].numel() for n in trained) < ft["total_params"]
    assert ft["held_out_loss_after"] < ft["held_out_loss_before"]  # the loss falls
    assert [c["step"] for c in ft["curve"]] == list(range(1, 7)) and "held_out_loss" in ft["curve"][2]


def test_optimizer_state_covers_only_trained_parameters(checkpoint, corpus_file, tmp_path, monkeypatch):
    from compress.finetune import _state_dir

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    cfg = _cfg(corpus_file, train="lrc")
    assert finetune(str(checkpoint), cfg, tmp_path / "out", device="cpu", stop_at=3) == {"interrupted_at": 3}
    assert not (tmp_path / "out").exists()  # nothing half-written
    state = torch.load(_state_dir(str(checkpoint), cfg) / STATE_FILE, weights_only=False)
    n = len(select(compress.load(checkpoint), "lrc"))
    assert state["step"] == 2 and len(state["params"]) == n and len(state["optimizer"]["state"]) == n


def test_resume_after_a_crash_ends_on_the_same_weights(checkpoint, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    cfg = _cfg(corpus_file, grad_accum=2)
    finetune(str(checkpoint), cfg, tmp_path / "whole", device="cpu")
    finetune(str(checkpoint), cfg, tmp_path / "resumed", device="cpu", stop_at=5)  # the state of step 4 stays
    report = finetune(str(checkpoint), cfg, tmp_path / "resumed", device="cpu", resume=True)
    assert report["finetune"]["resumed_from"] == 4
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    model = compress.load(tmp_path / "resumed")  # the same structure, reloadable
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "LowRankLinear"


def test_bad_data_is_one_line(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    short = tmp_path / "short.txt"
    short.write_text("too little text")
    with pytest.raises(LrcError, match="short.txt.*fewer than one window"):
        finetune(str(checkpoint), FinetuneConfig(data=str(short), seq_len=64), tmp_path / "out", device="cpu")
    result = CliRunner().invoke(app, ["finetune", str(checkpoint), "--data", str(short), "--out",
                                      str(tmp_path / "out"), "--seq-len", "64"])
    assert result.exit_code != 0 and result.output.strip().count("\n") == 0  # the data fails before the model loads
    assert result.output.startswith("error:") and "short.txt" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["finetune", str(checkpoint), "--data", str(short), "--out",
                                      str(tmp_path / "out"), "--train", "everything"])
    assert result.exit_code != 0 and "train" in result.output
    with pytest.raises(LrcError, match="finetune.data: .*missing.txt: file not found"):
        finetune(str(checkpoint), FinetuneConfig(data=str(tmp_path / "missing.txt")), tmp_path / "out", device="cpu")
