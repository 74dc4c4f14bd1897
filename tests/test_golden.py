"""Refactors change no result: compressions of the real stories260k (every method, allocator and engine mode the
code had before the method protocol was generalised) give the same weights, config and report, byte for byte, as
recorded in ``tests/data/golden-stories260k.json`` by ``scripts/golden.py`` (timings and paths excluded).

The README's main job on SmolLM2 gets the same check in ``.ci/run`` against ``docs/results/golden-main-job.json``.
"""
import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, STORIES, needs_shared

sys.path.insert(0, str(ROOT / "scripts"))
import golden  # noqa: E402

GOLDEN = json.loads((ROOT / "tests" / "data" / "golden-stories260k.json").read_text())

pytestmark = needs_shared()


@pytest.fixture(scope="module")
def results():
    return golden.run_cases(str(STORIES), list(GOLDEN))


@pytest.mark.parametrize("case", list(GOLDEN))
def test_checkpoint_and_report_unchanged(results, case):
    assert results[case] == GOLDEN[case]


def test_fingerprint_sees_a_changed_weight(tmp_path):
    """The check can fail: one changed weight byte changes the fingerprint."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(STORIES).save_pretrained(tmp_path / "a")
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    with __import__("torch").no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    model.save_pretrained(tmp_path / "b")
    a, b = golden.fingerprint(tmp_path / "a"), golden.fingerprint(tmp_path / "b")
    assert a["config.json"] == b["config.json"] and a["model.safetensors"] != b["model.safetensors"]


def test_fingerprint_ignores_library_version_stamps(tmp_path):
    """A new transformers stamps its own version into config.json (and the report records torch's): the
    fingerprints leave those stamps out, but any other change of the config (lrc's section included) still counts."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(STORIES).save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "transformers_version" in config
    base = golden.fingerprint(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "transformers_version": "99.0.0"}, indent=2))
    assert golden.fingerprint(tmp_path / "a")["config.json"] == base["config.json"]
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "lrc": {"modules": {"x": {"rank": 3}}}}))
    assert golden.fingerprint(tmp_path / "a")["config.json"] != base["config.json"]
    report = {"lrc_version": "0.1.0", "torch": "2.13.0", "modules": [{"name": "m", "rank": 3}]}
    (tmp_path / "a" / "lrc_report.json").write_text(json.dumps(report))
    first = golden.fingerprint(tmp_path / "a")["lrc_report.json"]
    (tmp_path / "a" / "lrc_report.json").write_text(json.dumps({**report, "torch": "9.9.9"}))
    assert golden.fingerprint(tmp_path / "a")["lrc_report.json"] == first
    (tmp_path / "a" / "lrc_report.json").write_text(json.dumps({**report, "modules": [{"name": "m", "rank": 4}]}))
    assert golden.fingerprint(tmp_path / "a")["lrc_report.json"] != first
