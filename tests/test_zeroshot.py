"""Zero-shot: lrc's local-file lm-eval tasks, the field conversions, and agreement with lm-eval's own CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from compress.cli import app
from compress.errors import LrcError
from compress.eval import zeroshot
from conftest import SHARED, STORIES, needs_shared

DATA = SHARED / "data"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))


def _load_docs(data_dir: Path, task: str):
    """Load a task's split through its materialised YAML the way lm-eval does (process_docs included)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(zeroshot.materialize(data_dir)), include_defaults=False)
    return list(tm.load([task])["tasks"][task].eval_docs)


def test_fields_are_mapped_to_the_hub_layout(tmp_path):
    d = tmp_path / "data"
    (d / "arc_easy").mkdir(parents=True)
    q = {"id": "x", "question": {"stem": "Why?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
         "answerKey": "B"}
    for name in ("ARC-Easy-Dev.jsonl", "ARC-Easy-Test.jsonl"):
        (d / "arc_easy" / name).write_text(json.dumps(q) + "\n")
    (d / "piqa").mkdir()
    (d / "piqa" / "valid.jsonl").write_text("".join(json.dumps({"goal": f"g{i}", "sol1": "x", "sol2": "y"}) + "\n"
                                                    for i in range(3)))
    (d / "piqa" / "valid-labels.lst").write_text("1\n0\n1\n")
    (d / "boolq").mkdir()
    (d / "boolq" / "dev.jsonl").write_text(json.dumps({"question": "q", "title": "t", "answer": True,
                                                       "passage": "p"}) + "\n")
    arc = _load_docs(d, "arc_easy")
    assert arc[0]["question"] == "Why?" and arc[0]["choices"] == {"text": ["a", "b"], "label": ["A", "B"]}
    assert [doc["label"] for doc in _load_docs(d, "piqa")] == [1, 0, 1]
    assert _load_docs(d, "boolq")[0]["label"] == 1
    (d / "piqa" / "valid-labels.lst").write_text("1\n0\n")  # a labels file out of step with the rows fails loudly
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        _load_docs(d, "piqa")


def test_bad_tasks_and_data_dirs_get_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LRC_DATA_DIR", raising=False)
    with pytest.raises(LrcError, match="--data-dir"):
        zeroshot.resolve_data_dir(None)
    with pytest.raises(LrcError, match="not a directory"):
        zeroshot.resolve_data_dir(tmp_path / "nope")
    with pytest.raises(LrcError, match="unknown task"):
        zeroshot.check_tasks(["mmlu"], tmp_path)
    with pytest.raises(LrcError, match=r"missing data file .*piqa/valid-labels.lst"):
        (tmp_path / "piqa").mkdir()
        (tmp_path / "piqa" / "valid.jsonl").write_text("{}\n")
        zeroshot.check_tasks(["piqa"], tmp_path)
    res = CliRunner().invoke(app, ["eval", "unused-model", "--tasks", "arc_easy,squad"])
    assert res.exit_code == 2 and "tasks" in res.output and "squad" in res.output


def test_every_shipped_task_names_its_files():
    for task in zeroshot.TASKS:
        files = zeroshot.required_files(task)
        assert files and all(not f.startswith("/") for f in files), task


@needs_shared(DATA / "piqa")
def test_materialised_tasks_read_the_shared_files():
    inc = zeroshot.materialize(DATA.resolve())
    text = (inc / "piqa.yaml").read_text()
    assert "$LRC_DATA_DIR" not in text and str(DATA.resolve() / "piqa" / "valid.jsonl") in text
    assert (inc / "data_dir.txt").read_text() == str(DATA.resolve())
    zeroshot.check_tasks(list(zeroshot.TASKS), DATA.resolve())


@needs_shared(DATA / "arc_easy")
def test_python_api_equals_lm_eval_cli_on_every_task(tmp_path):
    """lrc's path (HFLM over the loaded model, TaskManager(include_path)) gives the same numbers as lm-eval's own
    CLI loading the model itself with the same task files: this proves the YAMLs and the wiring, not the model."""
    tasks, limit = list(zeroshot.TASKS), 20
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    tok = AutoTokenizer.from_pretrained(STORIES)
    ours = zeroshot.zero_shot(model, tok, tasks, DATA, limit=limit, batch_size=8, cache=False)
    out = tmp_path / "lm_eval_out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cli = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={STORIES},dtype=float32",
           "--include_path", ours["include_path"], "--tasks", ",".join(tasks), "--limit", str(limit),
           "--batch_size", "8", "--device", "cpu", "--output_path", str(out)]
    proc = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    for t in tasks:
        for metric, value in ours["tasks"][t].items():
            if metric in ("acc", "acc_norm", "perplexity"):
                assert value == pytest.approx(theirs[t][f"{metric},none"], rel=1e-6), (t, metric)
        assert ours["tasks"][t]["n"] == limit
    assert set(ours["tasks"]["arc_easy"]) >= {"acc", "acc_norm", "acc_stderr"} and "acc_norm" not in \
        ours["tasks"]["winogrande"]
    assert ours["mean"]["acc"] == pytest.approx(sum(ours["tasks"][t]["acc"] for t in tasks) / len(tasks))


def test_request_cache_is_per_weights_not_per_path(tiny_model_dir, tokenizer, tmp_path):
    """lm-eval's cached answers belong to the weights: the same directory whose weights were replaced (same config,
    e.g. a checkpoint overwritten by a new compression) must not reuse them, and the same weights loaded again must.
    Separately loaded models from one path, so neither object identity nor the path can make the keys (un)equal.
    (The fingerprint also hashes the config's ``_name_or_path``: a copy of the weights elsewhere gets its own key.)"""
    import shutil

    from conftest import tiny_config

    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), path)  # the session's fixture directory stays untouched
    a = AutoModelForCausalLM.from_pretrained(path)
    a_again = AutoModelForCausalLM.from_pretrained(path)
    assert zeroshot.request_cache_path(a) == zeroshot.request_cache_path(a_again)
    torch.manual_seed(1)  # same config, other weights, written over the same files
    AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer))).save_pretrained(path)
    b = AutoModelForCausalLM.from_pretrained(path)
    assert b.config.to_json_string(use_diff=False) == a.config.to_json_string(use_diff=False)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
    assert zeroshot.request_cache_path(a) != zeroshot.request_cache_path(b)
