"""Progress when stderr is not a terminal (batch jobs, nohup, CI): one plain line per block and per phase, so a
long run shows signs of life in its log; on a terminal the rich bar. Plain lines are printed when a phase ENDS, so a
run that fails inside a phase still shows only its one-line error."""
import io
import json
import re

import yaml
from rich.console import Console
from typer.testing import CliRunner

from compress.cli import app
from compress.progress import Progress

BLOCK = re.compile(r"^block (\d+)/(\d+): ([\d.]+) s \(load [\d.]+ s, statistics [\d.]+ s, decompose [\d.]+ s, propagate [\d.]+ s, "
                   r"save [\d.]+ s\), "
                   r"mean rel\. error ([\d.]+)$")


def test_mode_follows_the_console():
    assert Progress(console=Console(file=io.StringIO(), force_terminal=True)).mode == "rich"
    assert Progress(console=Console(file=io.StringIO())).mode == "plain"
    assert Progress(enabled=False, console=Console(file=io.StringIO(), force_terminal=True)).mode == "off"


def test_lrc_compress_logs_one_line_per_block_when_not_a_terminal(tiny_model_dir, corpus_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"dataset": str(corpus_file), "samples": 8, "seq_len": 32},
                                      "engine": {"device": "cpu", "batch_size": 4},
                                      "stages": [{"method": "svd-llm", "param_ratio": 0.5}]}))
    res = CliRunner().invoke(app, ["compress", str(tiny_model_dir("llama")), "--recipe", str(recipe),
                                   "--out", str(tmp_path / "ck"), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    blocks = [BLOCK.match(ln) for ln in lines if ln.startswith("block ")]
    assert all(blocks) and [(m[1], m[2]) for m in blocks] == [("1", "3"), ("2", "3"), ("3", "3")], res.stderr
    rows = json.loads((tmp_path / "ck" / "lrc_report.json").read_text())["modules"]
    errs = [r["rel_error"] for r in rows if r["type"] == "lowrank"]
    assert len(errs) == 21
    assert float(blocks[-1][4]) == round(sum(errs) / len(errs), 4)  # the running mean over every block
    first = [r["rel_error"] for r in rows[:7] if r["type"] == "lowrank"]
    assert float(blocks[0][4]) == round(sum(first) / len(first), 4)
    assert any(re.fullmatch(r"calibration tokens: [\d.]+ s", ln) for ln in lines), res.stderr
    assert any(re.fullmatch(r"capture: [\d.]+ s", ln) for ln in lines), res.stderr
    assert "\x1b[" not in res.stderr and "━" not in res.stderr  # no bar, no cursor movement in a log


def _plain(clock, **kw):
    buf = io.StringIO()
    return Progress(console=Console(file=buf, width=200), clock=lambda: clock[0], **kw), buf


def test_phases_of_one_family_make_one_line_and_long_ones_a_heartbeat():
    """``spectra …`` and ``sensitivity …`` are one allocation phase: one line at its end, plus a heartbeat line
    when it runs long, never one line per matrix."""
    t = [0.0]
    p, buf = _plain(t, heartbeat=30)
    p.phase("calibration tokens")
    t[0] = 1.5
    p.phase("capture block-0 inputs")
    t[0] = 2.0
    for i in range(3):
        p.phase(f"spectra for allocation, block {i + 1}/3")
        for m in range(5):
            t[0] += 4
            p.phase(f"sensitivity model.layers.{i}.m{m}")
    p.start_blocks(3, 0)
    lines = buf.getvalue().splitlines()
    assert lines[:2] == ["calibration tokens: 1.5 s", "capture: 0.5 s"]
    assert lines[-1] == "allocation: 60.0 s"
    beats = lines[2:-1]
    assert len(beats) == 1 and beats[0].startswith("allocation: sensitivity model.layers.1.m2 (32 s so far)"), lines


def test_failure_inside_a_phase_prints_nothing():
    t = [0.0]
    p, buf = _plain(t)
    p.phase("calibration tokens")
    t[0] = 3
    p.close()  # what the callers' ``finally`` does after an error
    assert buf.getvalue() == ""


def test_lrc_eval_logs_each_perplexity_set(tiny_model_dir, corpus_file, tmp_path):
    res = CliRunner().invoke(app, ["eval", str(tiny_model_dir("llama")), "--ppl", str(corpus_file), "--seq-len", "32",
                                   "--max-windows", "2"])
    assert res.exit_code == 0, res.output
    assert re.search(rf"^perplexity {re.escape(str(corpus_file))}: [\d.]+ s$", res.stderr, re.M), res.stderr
