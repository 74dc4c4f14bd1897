"""Calibration sources: local files, named sets through the datasets hub code path (on local files), windows."""
import json

import pytest
import torch

from compress import calibration
from compress.calibration import calibration_tokens, windows_from_ids
from compress.errors import LrcError
from compress.recipe import CalibrationConfig


def test_windows_are_distinct_non_overlapping_and_seeded():
    ids = torch.arange(1000)
    w = windows_from_ids(ids, samples=5, seq_len=100, seed=0, source="x")
    assert w.shape == (5, 100)
    starts = w[:, 0].tolist()
    assert all(s % 100 == 0 for s in starts) and len(set(starts)) == 5
    assert torch.equal(w, windows_from_ids(ids, 5, 100, 0, "x"))
    assert not torch.equal(w, windows_from_ids(ids, 5, 100, 1, "x"))
    with pytest.raises(LrcError, match="too little for 11 samples"):
        windows_from_ids(ids, 11, 100, 0, "x")


def test_named_set_goes_through_datasets(monkeypatch, tmp_path, corpus_file, tokenizer):
    """A calib/ set definition is loaded with datasets.load_dataset, the code path used for hub ids; here the
    dataset is the local json builder so the test runs offline."""
    (tmp_path / "localset.yaml").write_text(
        f"description: test\npath: json\ndata_files: {corpus_file}\nsplit: train\ntext_field: text\n")
    monkeypatch.setattr(calibration, "CALIB_DIR", tmp_path)
    cfg = CalibrationConfig(dataset="localset", samples=4, seq_len=16)
    ids = calibration_tokens(None, tokenizer, cfg, tmp_path / "cache")
    assert ids.shape == (4, 16)
    local = calibration_tokens(None, tokenizer, CalibrationConfig(dataset=str(corpus_file), samples=4, seq_len=16),
                               tmp_path / "cache")
    assert torch.equal(ids, local)  # same rows, same tokens, same windows


def test_shipped_sets_are_well_formed():
    sets = calibration.named_sets()
    assert {"wikitext2", "c4", "ptb"} <= set(sets)
    for spec in sets.values():
        assert {"path", "split", "text_field"} <= set(spec)


def test_unreachable_hub_set_is_one_line_error(monkeypatch, tokenizer, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LrcError, match="offline\\? pass a local .jsonl") as err:
        calibration_tokens(None, tokenizer, CalibrationConfig(dataset="wikitext2", samples=2, seq_len=8),
                           tmp_path / "cache")
    assert "\n" not in str(err.value)


def test_parquet_and_txt(tmp_path, tokenizer, corpus_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in corpus_file.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist([{"body": r["text"]} for r in rows]), tmp_path / "c.parquet")
    cfg = CalibrationConfig(dataset=str(tmp_path / "c.parquet"), samples=4, seq_len=16, text_field="body")
    assert calibration_tokens(None, tokenizer, cfg, tmp_path / "cache").shape == (4, 16)
    (tmp_path / "c.txt").write_text("\n\n".join(r["text"] for r in rows))
    cfg = CalibrationConfig(dataset=str(tmp_path / "c.txt"), samples=4, seq_len=16)
    assert calibration_tokens(None, tokenizer, cfg, tmp_path / "cache").shape == (4, 16)
