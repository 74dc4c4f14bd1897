"""Bad input that used to escape the one-line error path (a traceback, or minutes of work before a crash): each gives
exactly one line ``error: …`` naming the field or file, exit status 2, and nothing at --out."""
import os
from pathlib import Path
import sys

import pytest
import yaml
from typer.testing import CliRunner

from compress import cli
from compress.cli import app
from compress.errors import LrcError

runner = CliRunner()


def _recipe(tmp_path, corpus, calibration=None, stage=None):
    data = {"calibration": {"dataset": str(corpus), "samples": 2, "seq_len": 32, **(calibration or {})},
            "engine": {"device": "cpu", "batch_size": 2},
            "stages": [{"method": "svd-llm", "param_ratio": 0.5, **(stage or {})}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _one_line(args, expect, out=None):
    res = runner.invoke(app, args)
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip() and not ln.startswith("Loading")]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert expect in lines[0], lines[0]
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return lines[0]


def _compress(model, recipe, tmp_path, *extra):
    out = tmp_path / "out"
    return ["compress", model, "--recipe", recipe, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            *extra], out


CTX = "exceeds the model's context (max_position_embeddings 128)"


def test_calibration_longer_than_the_context_is_refused_before_any_work(tiny_model_dir, corpus_file, tmp_path):
    model = str(tiny_model_dir("llama"))
    args, out = _compress(model, _recipe(tmp_path, corpus_file, {"seq_len": 256}), tmp_path)
    _one_line(args, f"calibration.seq_len: 256 {CTX}", out)
    assert not (tmp_path / "cache").exists()  # no tokens, no activations
    args, out = _compress(model, _recipe(tmp_path, corpus_file), tmp_path, "--seq-len", "4096")
    _one_line(args, f"calibration.seq_len: 4096 {CTX}", out)
    stage = {"calibration": {"dataset": str(corpus_file), "samples": 2, "seq_len": 300}}
    args, out = _compress(model, _recipe(tmp_path, corpus_file, stage=stage), tmp_path)
    _one_line(args, f"stages[0].calibration.seq_len: 300 {CTX}", out)


def test_compensate_bad_input(tiny_model_dir, corpus_file, tmp_path):
    model = str(tiny_model_dir("llama"))
    out = tmp_path / "out"
    base = ["compensate", model, model, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--calib", str(corpus_file), "--samples", "2"]
    _one_line(base + ["--rank", "4", "--seq-len", "1000"], f"calibration.seq_len: 1000 {CTX}", out)
    _one_line(base, "give exactly one of --rank and --param-ratio", out)
    _one_line(base + ["--rank", "4", "--export", "onnx"], "--export: 'onnx'", out)
    _one_line(base + ["--param-ratio", "0.1", "--allocator", "nope"], "allocator", out)
    _one_line(["compensate", str(tmp_path / "missing"), model, "--rank", "4", "--out", str(out)],
              "model path not found", out)


def test_a_gguf_name_on_something_else(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc-cache"))
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a gguf file\n" * 10)
    args, out = _compress(str(fake), _recipe(tmp_path, corpus_file), tmp_path)
    _one_line(args, f"{fake}: not a GGUF file", out)
    fake.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)  # the magic, then garbage
    _one_line(args, f"{fake}: cannot read GGUF", out)
    _one_line(["bench", str(fake)], f"{fake}: cannot read GGUF")
    assert not list((tmp_path / "lrc-cache").rglob("*.safetensors"))


@pytest.mark.parametrize("option,value,expect", [
    ("--seq-lens", "x", "--seq-lens: 'x' is not a comma-separated list of positive integers"),
    ("--seq-lens", "128,,512", "--seq-lens: '128,,512'"),
    ("--decode-batches", "1,0", "--decode-batches: '1,0'"),
    ("--decode-batches", "-1", "--decode-batches: '-1'"),
    ("--repeats", "0", "--repeats: must be at least 1"),
])
def test_bench_lists(option, value, expect, tiny_model_dir):
    _one_line(["bench", str(tiny_model_dir("llama")), option, value], expect)


def test_other_commands_one_line(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    _one_line(["eval", model, "--seq-len", "0"], "seq_len")
    _one_line(["bench", str(tmp_path / "missing")], "model path not found")
    _one_line(["info", str(tmp_path / "missing")], "not a checkpoint directory")
    _one_line(["push", str(tmp_path / "missing"), "me/repo", "--dry-run"], "not an lrc checkpoint")


def test_main_prints_an_escaped_error_on_one_line(monkeypatch, capsys):
    """``main()`` catches an ``LrcError`` raised outside a command body; a long message stays on one line."""
    msg = "calibration.dataset: " + "a very long explanation " * 12

    def boom(*a, **k):
        raise LrcError(msg)

    monkeypatch.setattr(cli, "app", boom)
    monkeypatch.setattr(sys, "argv", ["lrc"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {msg}"]


@pytest.mark.parametrize("args,expect", [
    (["bench", "x", "--repeats", "abc"], "lrc bench: Invalid value for '--repeats'"),
    (["compress"], "lrc compress: Missing argument"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_usage_errors_are_one_line_through_main(args, expect):
    """Errors the argument parser finds (a non-integer, a missing argument, an unknown command) go through the same
    one-line path as lrc's own, not typer's multi-line box."""
    import subprocess
    import sys

    lrc = Path(sys.executable).with_name("lrc")  # the console script installed beside this interpreter
    if not lrc.is_file():
        pytest.skip(f"{lrc}: lrc is not installed in this environment")
    res = subprocess.run([str(lrc), *args], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "80"})
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stdout + res.stderr
    assert expect in lines[0]
