"""lrc push: the model card, --dry-run, one-line errors, and a real upload to a local stand-in for the hub."""
import json

import pytest
import yaml
from typer.testing import CliRunner

from compress.cli import app
from compress.publish.card import MARKER, base_model_id
from conftest import tiny_recipe
from hub_server import FakeHub

TOKEN = "hf_secretTOKEN1234567890"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_dir, corpus_file):
    from compress import api

    out = tmp_path_factory.mktemp("push") / "ck"
    api.compress(str(tiny_model_dir("llama")), tiny_recipe(corpus_file, param_ratio=0.6), out,
                 cache_dir=out.parent / "cache", progress=False)
    report = json.loads((out / "lrc_report.json").read_text())
    report["model"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # as if compressed from the hub model
    report["eval"] = {"zero_shot": {"tasks": {"piqa": {"acc": 0.5, "acc_norm": 0.55, "n": 10}}, "limit": 10,
                                    "mean": {"acc": 0.5, "acc_norm": 0.55}, "lm_eval_version": "0.4.13"}}
    (out / "lrc_report.json").write_text(json.dumps(report))
    return out


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_base_model_ids():
    assert base_model_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert base_model_id("/data/models/llama") is None and base_model_id("./x/y") is None
    assert base_model_id("model.gguf") is None


def test_dry_run_writes_nothing_and_needs_no_token(checkpoint, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(checkpoint.parent / "hf_home"))  # no stored login
    res = CliRunner().invoke(app, ["push", str(checkpoint), "me/tiny-lrc", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "README.md" in res.output and "model.safetensors" in res.output and "modeling_lrc.py" in res.output
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in res.output
    assert not (checkpoint / "README.md").exists()
    nok = CliRunner().invoke(app, ["push", str(checkpoint), "me/tiny-lrc"])
    assert nok.exit_code == 2 and "no Hugging Face token" in nok.output and "--token" in nok.output
    bad = CliRunner().invoke(app, ["push", str(checkpoint.parent), "me/tiny-lrc", "--dry-run"])
    assert bad.exit_code == 2 and "not an lrc checkpoint" in bad.output


def test_upload_to_a_local_hub(checkpoint, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    with FakeHub() as hub:
        res = CliRunner().invoke(app, ["push", str(checkpoint), "me/tiny-lrc", "--private", "--token", TOKEN,
                                       "--endpoint", hub.url])
        assert res.exit_code == 0, res.output + str(hub.unhandled)
        assert TOKEN not in res.output
        created = hub.repos["me/tiny-lrc"]
        assert created.get("visibility") == "private" or created.get("private") is True, created
        assert all(a == f"Bearer {TOKEN}" for a in hub.auth)
        got = hub.files["me/tiny-lrc"]
        local = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
        assert set(got) == set(local) and all(got[k] == local[k] for k in got)
        card = got["README.md"].decode()
        meta = _front_matter(card)
        assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert meta["library_name"] == "transformers" and {"lrc", "low-rank", "svd-llm"} <= set(meta["tags"])
        assert MARKER in card and "trust_remote_code=True" in card and "| piqa | 0.5000 | 0.5500 |" in card
        report = json.loads(local["lrc_report.json"])
        assert f"{report['targeted']['params_after']:,}" in card and "param_ratio: 0.6" in card

        (checkpoint / "README.md").write_text("# my own card\n")  # a user's own card is kept, not overwritten
        res = CliRunner().invoke(app, ["push", str(checkpoint), "me/tiny-lrc", "--token", TOKEN,
                                       "--endpoint", hub.url])
        assert res.exit_code == 0 and hub.files["me/tiny-lrc"]["README.md"] == b"# my own card\n"
    res = CliRunner().invoke(app, ["push", str(checkpoint), "me/tiny-lrc", "--token", TOKEN, "--endpoint", hub.url])
    assert res.exit_code == 2 and "push to me/tiny-lrc failed" in res.output and TOKEN not in res.output


def test_card_names_every_calibration_set(tmp_path):
    from compress.publish.card import model_card

    recipe = {"calibration": {"dataset": "wikitext2", "samples": 32, "seq_len": 256, "seed": 0},
              "stages": [{"method": "svd-llm", "param_ratio": 0.7},
                         {"method": "eora", "rank": 8, "calibration": {
                             "samples": 16, "seq_len": 128, "mix": [{"dataset": "wikitext2"}, {"dataset": "arc_easy"}]}}]}
    (tmp_path / "lrc_report.json").write_text(json.dumps({"recipe": recipe, "model": "m"}))
    (tmp_path / "config.json").write_text(json.dumps({"lrc": {"base_architecture": "LlamaForCausalLM"}}))
    card = model_card(tmp_path, "me/x")
    assert "Calibration: 32 × 256 tokens of `wikitext2` (seed 0); stage 1 (eora) on 16 × 128 tokens of " \
           "`wikitext2` + `arc_easy`." in card
