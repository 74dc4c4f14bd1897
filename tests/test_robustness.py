"""Robustness figures: generated malformed recipes, failures injected at every point of a compression, and
rank-deficient calibration for every method and allocator."""
import json
import random

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compress import api
from compress.cli import app
from compress.engine import pipeline
from compress.progress import Progress
from conftest import kill_at, tiny_recipe

runner = CliRunner()
N_RECIPES = 1000

# malformed recipes --------------------------------------------------------------------------------------------------

BAD_VALUES = st.sampled_from([None, "lots", -1, 0, 1.5, 7, [], {}, [1, 2], {"x": 1}, "", "(unclosed"])
FIELDS = {  # where a wrong value can go (the error's field path names it), and values that are wrong there
    ("calibration", "samples"): [0, -1, 1.5, "lots", None, [], {}],
    ("calibration", "seq_len"): [1, 0, -5, 2.5, "lots", None],
    ("calibration", "dataset"): [None, -1, [], {"x": 1}],
    ("calibration", "seed"): ["lots", 1.5, None, [1, 2]],
    ("engine", "batch_size"): [0, -1, "lots", None, 2.5],
    ("engine", "propagate"): ["lots", "", 7, None],
    ("engine", "sequential"): ["lots", 7, [], None],
    ("engine", "objective"): ["lots", "", 7, None],
    ("engine", "dense_damping"): [-1, -0.5, "lots", None, []],
    ("model", "dtype"): ["float8", "lots", 7, None],
}
STAGE_FIELDS = ["param_ratio", "rank", "energy", "allocator", "targets", "ignore", "align", "options", "method"]


def _base(corpus) -> dict:
    return {"calibration": {"dataset": str(corpus), "samples": 8, "seq_len": 32},
            "engine": {"device": "cpu", "batch_size": 4}, "model": {"dtype": "float32"},
            "stages": [{"method": "svd-llm", "param_ratio": 0.5}]}


@st.composite
def malformed(draw, corpus: str, missing: str) -> tuple[str, str]:
    """A recipe text that is wrong in one drawn way, and a fragment its error line must contain."""
    data = _base(corpus)
    kind = draw(st.sampled_from(["section", "stage", "unknown", "ratio", "empty", "budgets", "regex", "missing",
                                 "yaml", "not-mapping", "allocator", "options"]))
    if kind == "section":
        section, field = draw(st.sampled_from(sorted(FIELDS)))
        value = draw(st.sampled_from(FIELDS[(section, field)]))
        data[section][field] = value
        expect = f"{section}.{field}"
    elif kind == "stage":
        field = draw(st.sampled_from(STAGE_FIELDS))
        value = draw(BAD_VALUES.filter(lambda v: v is not None and v != []))
        if field in ("targets", "ignore") and isinstance(value, list):
            value = 5
        if field == "align" and value == 7:  # a valid alignment
            value = 0
        if field == "options" and isinstance(value, dict):
            value = {"nope": 1} if not value else value
        data["stages"][0][field] = value
        expect = "stages[0]"
    elif kind == "unknown":
        where = draw(st.sampled_from(["top", "calibration", "engine", "stage"]))
        key = draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=10).filter(
            lambda k: k not in {"name", "model", "mix", "seed", "align", "rank", "eval", "device", "format",
                                "description", "method", "ignore", "targets", "options", "energy", "stages"}))
        target = {"top": data, "calibration": data["calibration"], "engine": data["engine"],
                  "stage": data["stages"][0]}[where]
        if key in target:
            key += "_x"
        target[key] = 1
        expect = "unknown key"
    elif kind == "ratio":
        data["stages"][0]["param_ratio"] = draw(st.one_of(st.floats(max_value=0, allow_nan=False),
                                                          st.floats(min_value=1.0001, allow_infinity=False,
                                                                    allow_nan=False)))
        expect = "param_ratio"
    elif kind == "empty":
        data["stages"] = []
        expect = "stages"
    elif kind == "budgets":
        data["stages"][0].update(draw(st.sampled_from([{"rank": 4}, {"energy": 0.9}, {"rank": 4, "energy": 0.5}])))
        expect = "exactly one budget"
    elif kind == "regex":
        data["stages"][0]["targets"] = [draw(st.sampled_from(["(", "[a-", "*q", "q_proj)", "(?P<"]))]
        expect = "bad regex"
    elif kind == "missing":
        data["calibration"]["dataset"] = missing
        expect = "not found"
    elif kind == "yaml":
        return "stages: [method: svd\n  - " + draw(st.text("abc: [{", min_size=1, max_size=5)), "not valid YAML"
    elif kind == "not-mapping":
        return yaml.safe_dump(draw(st.sampled_from([[1, 2], "text", 3]))), "must be a YAML mapping"
    elif kind == "allocator":
        data["stages"][0]["allocator"] = draw(st.sampled_from(["welore", "energy", "loss"]))
        data["stages"][0].pop("param_ratio")
        data["stages"][0]["rank"] = 4
        expect = "give param_ratio"
    else:
        data["stages"][0]["options"] = {draw(st.sampled_from(["dampin", "rtol_", "whiten"])): 1}
        expect = "unknown key"
    return yaml.safe_dump(data), expect


@pytest.fixture(scope="module")
def bad_env(tmp_path_factory, tiny_model_dir, corpus_file):
    d = tmp_path_factory.mktemp("bad")
    return d, str(tiny_model_dir("llama")), str(corpus_file)


def test_generated_malformed_recipes_fail_in_one_line(bad_env):
    d, model, corpus = bad_env
    tried = []

    @settings(max_examples=N_RECIPES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        text, expect = data.draw(malformed(corpus, str(d / "no-such-file.jsonl")))
        recipe = d / "r.yaml"
        recipe.write_text(text)
        out = d / "out"
        res = runner.invoke(app, ["compress", model, "--recipe", str(recipe), "--out", str(out),
                                  "--cache-dir", str(d / "cache")])
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip() and not ln.startswith("Loading")]
        assert res.exit_code == 2, (text, res.output, res.exception)
        assert len(lines) == 1 and lines[0].startswith("error:"), (text, res.output)
        assert expect in lines[0], (text, expect, lines[0])
        assert not out.exists() and not list(d.glob(".out.*"))
        tried.append(expect)

    check()
    assert len(tried) == N_RECIPES
    print(f"\nmalformed recipes tried: {len(tried)}, kinds: {sorted(set(tried))}")


# failures injected at every point -----------------------------------------------------------------------------------

class Kill(BaseException):
    """Like a SIGKILL or Ctrl-C: not an Exception, so nothing on the way may swallow it."""


def _points(monkeypatch, model, recipe, tmp_path) -> list[str]:
    seen = []
    real = Progress.phase

    def record(self, text):
        seen.append(f"{getattr(self, '_block', '')}{text}")
        return real(self, text)

    monkeypatch.setattr(Progress, "phase", record)
    monkeypatch.setattr(pipeline, "after_block", lambda i: seen.append(f"after block {i}"))
    api.compress(model, recipe, tmp_path / "ref", cache_dir=tmp_path / "c0", progress=False)
    monkeypatch.setattr(Progress, "phase", real)
    monkeypatch.setattr(pipeline, "after_block", lambda i: None)
    return seen


@pytest.mark.parametrize("objective", ["layer", "dense"])
def test_kill_at_random_points_then_resume_is_byte_identical(objective, tiny_model_dir, corpus_file, tmp_path,
                                                             monkeypatch):
    """Every phase of every block (capture, statistics, decompose, propagate; block ends) is a point; a failure is
    injected at each point, in a shuffled order, and ``--resume`` must write the reference checkpoint's bytes each
    time."""
    model = str(tiny_model_dir("qwen2"))
    recipe = tiny_recipe(corpus_file, param_ratio=0.5, objective=objective)
    points = _points(monkeypatch, model, recipe, tmp_path)
    assert len(points) > 3 * 3
    ref = {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir() if p.suffix in (".safetensors", ".json")
           and p.name != "lrc_report.json"}
    rng = random.Random(f"kill-{objective}")
    chosen = rng.sample(range(len(points)), len(points))
    real = Progress.phase
    for k, at in enumerate(chosen):
        kill_at(monkeypatch, at, Kill(points[at]))
        out, cache = tmp_path / f"out{k}", tmp_path / f"c{k}"
        with pytest.raises(Kill):
            api.compress(model, recipe, out, cache_dir=cache, progress=False)
        assert not out.exists()
        monkeypatch.setattr(Progress, "phase", real)
        monkeypatch.setattr(pipeline, "after_block", lambda i: None)
        resume = (cache / "runs").is_dir() and any((cache / "runs").iterdir())  # a user resumes if anything is there
        api.compress(model, recipe, out, resume=resume, cache_dir=cache, progress=False)
        for name, data in ref.items():
            assert (out / name).read_bytes() == data, (points[at], name)
    print(f"\n{objective}: {len(chosen)} kill points of {len(points)}: {[points[a] for a in chosen]}")


# rank-deficient calibration -----------------------------------------------------------------------------------------

CONFIGS = [("svd", "uniform", {}), ("svd-llm", "uniform", {}), ("asvd", "uniform", {}), ("fwsvd", "uniform", {}),
           ("lord", "uniform", {}), ("lord", "uniform", {"variant": "weights"}), ("svd-llm", "energy", {}),
           ("svd-llm", "welore", {}), ("svd-llm", "loss", {}), ("svd-llm", "sensitivity", {}),
           ("asvd", "energy", {}), ("fwsvd", "loss", {})]


@pytest.mark.parametrize("calib", ["8-tokens", "repeated-sentence"])
@pytest.mark.parametrize("method,allocator,options", CONFIGS)
def test_rank_deficient_calibration_gives_finite_factors(method, allocator, options, calib, tiny_model_dir,
                                                         tmp_path):
    if calib == "8-tokens":
        text = " ".join(["the cat saw a big red ball in the park and then ran home"] * 3)
        samples, seq_len = 1, 8
    else:
        text = " ".join(["the dog ran fast."] * 200)
        samples, seq_len = 4, 32
    path = tmp_path / "calib.txt"
    path.write_text(text)
    stage = {"method": method, "param_ratio": 0.5, "allocator": allocator, "options": options}
    if allocator == "sensitivity":
        stage["allocator_options"] = {"ratios": [0.3, 0.6, 0.9], "samples": 1}
    from compress.recipe import parse_recipe

    recipe = parse_recipe({"calibration": {"dataset": str(path), "samples": samples, "seq_len": seq_len},
                           "engine": {"device": "cpu", "batch_size": 4},
                           "stages": [stage, {"method": "eora", "rank": 2}]})
    net, report = api.compress(str(tiny_model_dir("llama")), recipe, tmp_path / "o", cache_dir=tmp_path / "c",
                               progress=False)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert all(r["rel_error"] == r["rel_error"] for r in report["modules"])
    with torch.no_grad():
        assert torch.isfinite(net(torch.randint(3, 150, (1, 12))).logits).all()
    assert json.loads((tmp_path / "o" / "config.json").read_text())
