"""Stage calibration sets (engine/streams.py): a stage that names its own calibration gets statistics from that
text, propagated through the compressed blocks beside the recipe's stream; runs with several streams resume."""
import json

import pytest
import torch

from compress import api
from compress.engine import pipeline
from compress.errors import LrcError
from compress.recipe import parse_recipe
from conftest import make_corpus, tiny_recipe


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("other") / "other.jsonl"
    path.write_text("\n".join(json.dumps({"text": t.upper()}) for t in make_corpus(300, seed=7)))
    return path


def _recipe(main, first="svd", stage_calib=None, eora_calib=None, propagate="compressed", first_options=None):
    data = tiny_recipe(main, first, param_ratio=0.5, propagate=propagate).model_dump(mode="json")
    if first_options:
        data["stages"][0]["options"] = first_options
    if stage_calib is not None:
        data["stages"][0]["calibration"] = {"dataset": str(stage_calib), "samples": 6, "seq_len": 24}
    if eora_calib is not False:
        data["stages"].append({"method": "eora", "rank": 4})
        if eora_calib is not None:
            data["stages"][1]["calibration"] = {"dataset": str(eora_calib), "samples": 6, "seq_len": 24}
    return parse_recipe(data)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run(model_dir, recipe, tmp_path, tag):
    from compress.models import load_model

    model, tok, _ = load_model(str(model_dir))
    report = api.compress_model(model, recipe, tok, cache_dir=tmp_path / tag)
    return _state(model), report


@pytest.mark.parametrize("propagate", ["compressed", "original"])
def test_eora_stage_reads_its_own_calibration(propagate, tiny_model_dir, corpus_file, other_corpus, tmp_path):
    """svd (data-free) then eora calibrated on B, with the recipe's set A, equals the same recipe whose only set is
    B (with the same sample shape), and differs from eora calibrated on A: the stage's statistics come from B,
    propagated through the compressed blocks (or the original ones) exactly like a main stream."""
    d = tiny_model_dir("llama")
    main_a = _recipe(corpus_file, eora_calib=other_corpus, propagate=propagate)
    data = _recipe(other_corpus, propagate=propagate).model_dump(mode="json")
    data["calibration"].update(samples=6, seq_len=24)
    only_b = parse_recipe(data)
    only_a = _recipe(corpus_file, propagate=propagate)
    s_mixed, report = _run(d, main_a, tmp_path, "m")
    s_b, _ = _run(d, only_b, tmp_path, "b")
    s_a, _ = _run(d, only_a, tmp_path, "a")
    assert _same(s_mixed, s_b)
    assert not _same(s_mixed, s_a)
    streams = report["calibration_streams"]
    assert streams["acts"]["stages"] == [0] and streams["stage1"]["stages"] == [1]
    assert streams["stage1"]["tokens"] == 6 * 24 and streams["acts"]["tokens"] == 8 * 32


def test_fisher_stage_uses_its_own_calibration(tiny_model_dir, corpus_file, other_corpus, tmp_path):
    """fwsvd's Fisher sums and statistics come from the stage's set, not the recipe's."""
    d = tiny_model_dir("qwen2")
    own = _recipe(corpus_file, "fwsvd", stage_calib=other_corpus, eora_calib=False)
    data = _recipe(other_corpus, "fwsvd", eora_calib=False).model_dump(mode="json")
    data["calibration"].update(samples=6, seq_len=24)
    s_own, _ = _run(d, own, tmp_path, "own")
    s_b, _ = _run(d, parse_recipe(data), tmp_path, "b")
    s_a, _ = _run(d, _recipe(corpus_file, "fwsvd", eora_calib=False), tmp_path, "a")
    assert _same(s_own, s_b) and not _same(s_own, s_a)


def test_stages_sharing_a_set_share_one_stream(corpus_file, other_corpus):
    from compress.engine.streams import make_streams

    r = _recipe(corpus_file, "svd-llm", stage_calib=other_corpus, eora_calib=other_corpus)
    assert [(s.name, s.stages) for s in make_streams(r)] == [("acts", []), ("stage0", [0, 1])]


def test_resume_with_a_stage_stream_is_byte_identical(tiny_model_dir, corpus_file, other_corpus, tmp_path,
                                                      monkeypatch):
    model = str(tiny_model_dir("mistral"))
    recipe = _recipe(corpus_file, "svd-llm", eora_calib=other_corpus)
    api.compress(model, recipe, tmp_path / "ref", cache_dir=tmp_path / "c1", progress=False)

    def crash(i):
        if i == 1:
            raise RuntimeError("injected")

    monkeypatch.setattr(pipeline, "after_block", crash)
    with pytest.raises(RuntimeError, match="injected"):
        api.compress(model, recipe, tmp_path / "out", cache_dir=tmp_path / "c2", progress=False)
    run = next((tmp_path / "c2" / "runs").iterdir())
    assert (run / "stage1_2.bin").is_file() and (run / "kwargs_stage1.pt").is_file()
    assert not (run / "stage1_1.bin").exists()  # a finished block's inputs are dropped for every stream
    monkeypatch.setattr(pipeline, "after_block", lambda i: None)
    _, report = api.compress(model, recipe, tmp_path / "out", resume=True, cache_dir=tmp_path / "c2",
                             progress=False)
    assert report["resumed_from_block"] == 2
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_stage_calibration_rules(corpus_file, other_corpus):
    data = _recipe(corpus_file, "svd-llm", stage_calib=other_corpus, eora_calib=False).model_dump(mode="json")
    data["stages"][0]["allocator"] = "welore"
    with pytest.raises(LrcError, match="stages\\[0\\].calibration: global allocators"):
        parse_recipe(data)
    data["stages"][0]["allocator"] = "uniform"
    data["engine"]["objective"] = "dense"
    with pytest.raises(LrcError, match="stages\\[0\\].calibration: engine.objective dense"):
        parse_recipe(data)
    data["engine"]["objective"] = "layer"
    data["stages"][0]["calibration"]["samples"] = 0
    with pytest.raises(LrcError, match="stages\\[0\\].calibration.samples"):
        parse_recipe(data)


def test_cli_stage_calib_and_compensate_mix(tiny_model_dir, corpus_file, other_corpus, tmp_path):
    """``lrc compress --stage-calib 1=FILE`` gives stage 1 its own set; ``lrc compensate --calib A --calib B`` mixes
    A and B in equal shares; a bad INDEX is a one-line error with nothing written."""
    import yaml
    from typer.testing import CliRunner

    from compress.cli import app

    model = str(tiny_model_dir("llama"))
    data = _recipe(corpus_file).model_dump(mode="json")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    args = ["compress", model, "--recipe", str(tmp_path / "r.yaml"), "--cache-dir", str(tmp_path / "c")]
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "ck"), "--stage-calib", f"1={other_corpus}"])
    assert res.exit_code == 0, res.output
    streams = json.loads((tmp_path / "ck" / "lrc_report.json").read_text())["calibration_streams"]
    assert streams["stage1"]["sources"] == [str(other_corpus)] and streams["stage1"]["tokens"] == 8 * 32
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "bad"), "--stage-calib", "2=x.jsonl"])
    assert res.exit_code == 2 and "--stage-calib: '2=x.jsonl' is not INDEX=DATASET" in res.output
    assert not (tmp_path / "bad").exists()
    res = CliRunner().invoke(app, ["compensate", model, str(tmp_path / "ck"), "--rank", "2", "--calib",
                                   str(corpus_file), "--calib", str(other_corpus), "--samples", "4", "--seq-len",
                                   "16", "--out", str(tmp_path / "comp"), "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "comp" / "lrc_report.json").read_text())
    assert report["calibration_streams"]["acts"]["sources"] == [str(corpus_file), str(other_corpus)]
    assert report["recipe"]["calibration"]["mix"][1]["dataset"] == str(other_corpus)
