"""Interrupt after block k, resume, and get a byte-identical checkpoint."""
import pytest

from compress import api
from compress.engine import pipeline
from conftest import tiny_recipe


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("objective,crash_after", [("layer", 1), ("dense", 1), ("layer", 2)])
def test_resume_after_crash_is_byte_identical(objective, crash_after, tiny_model_dir, corpus_file, tmp_path,
                                              monkeypatch):
    """dense also keeps the dense activation stream; a crash after the last block (2) resumes with nothing left."""
    model = str(tiny_model_dir("llama"))
    recipe = tiny_recipe(corpus_file, param_ratio=0.5, objective=objective)
    api.compress(model, recipe, tmp_path / "ref", cache_dir=tmp_path / "c1", progress=False)

    def crash(i):
        if i == crash_after:
            raise Crash(f"injected failure after block {i}")

    monkeypatch.setattr(pipeline, "after_block", crash)
    with pytest.raises(Crash):
        api.compress(model, recipe, tmp_path / "out", cache_dir=tmp_path / "c2", progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial*"))
    monkeypatch.setattr(pipeline, "after_block", lambda i: None)

    _, report = api.compress(model, recipe, tmp_path / "out", resume=True, cache_dir=tmp_path / "c2", progress=False)
    assert report["resumed_from_block"] == crash_after + 1
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
