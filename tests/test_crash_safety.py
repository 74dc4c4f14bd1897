"""Outputs and resume are crash-safe: --out's parents are created, a replacement never leaves --out half-written,
a resume checks every file it reads (flushed, sized, checksummed) and refuses a cache it cannot trust."""
import json
import os

import pytest
import torch
from typer.testing import CliRunner

from compress import api, output
from compress.cli import app
from compress.engine import pipeline
from conftest import kill_at, tiny_recipe

runner = CliRunner()


class Crash(RuntimeError):
    pass


def _crash_after(monkeypatch, block: int) -> None:
    def crash(i):
        if i == block:
            raise Crash(f"injected failure after block {i}")
    monkeypatch.setattr(pipeline, "after_block", crash)


def _checkpoint_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_missing_parents_of_out_are_created(tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "runs" / "today" / "ck"
    api.compress(str(tiny_model_dir("llama")), tiny_recipe(corpus_file), out, cache_dir=tmp_path / "c",
                 progress=False)
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["ck"]  # no temporary directory left beside it


def test_out_under_a_file_is_one_line(tiny_model_dir, corpus_file, tmp_path):
    (tmp_path / "afile").write_text("x")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"calibration": {"dataset": str(corpus_file), "samples": 8, "seq_len": 32},
                                  "engine": {"device": "cpu"}, "stages": [{"method": "svd", "param_ratio": 0.5}]}))
    res = runner.invoke(app, ["compress", str(tiny_model_dir("llama")), "--recipe", str(recipe),
                              "--out", str(tmp_path / "afile" / "ck")])
    assert res.exit_code == 2 and res.output.strip().startswith("error:") and "not a directory" in res.output


@pytest.mark.parametrize("failure", ["save", "final-rename"])
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_failed_overwrite_keeps_the_old_checkpoint_whole(exchange, failure, tiny_model_dir, corpus_file, tmp_path,
                                                         monkeypatch):
    """A write failure while saving (disk full, injected after the weights are half written), or when the new
    checkpoint is moved into place: the old checkpoint is intact at --out and nothing else is left beside it; a
    successful overwrite replaces it whole."""
    model = str(tiny_model_dir("llama"))
    out = tmp_path / "ck"
    api.compress(model, tiny_recipe(corpus_file, param_ratio=0.5), out, cache_dir=tmp_path / "c", progress=False)
    old = _checkpoint_bytes(out)
    real_exchange = output._exchange if exchange else (lambda a, b: False)
    monkeypatch.setattr(output, "_exchange", real_exchange)
    real_save, real_replace = api.save_checkpoint_streamed, os.replace

    def failing_save(model, tokenizer, directory, *args):
        real_save(model, tokenizer, directory, *args)
        with open(directory / "model.safetensors", "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device (injected)")

    def failing_replace(src, dst):
        if str(dst) == str(out) and ".partial-" in str(src):
            raise OSError(5, "I/O error (injected)")
        return real_replace(src, dst)

    def failing_exchange(a, b):
        raise OSError(5, "I/O error (injected)")

    if failure == "save":
        monkeypatch.setattr(api, "save_checkpoint_streamed", failing_save)
    elif exchange:
        monkeypatch.setattr(output, "_exchange", failing_exchange)
    else:
        monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        api.compress(model, tiny_recipe(corpus_file, param_ratio=0.7), out, overwrite=True, cache_dir=tmp_path / "c",
                     progress=False)
    assert _checkpoint_bytes(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "ck"]
    monkeypatch.setattr(api, "save_checkpoint_streamed", real_save)
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(output, "_exchange", real_exchange)
    api.compress(model, tiny_recipe(corpus_file, param_ratio=0.7), out, overwrite=True, cache_dir=tmp_path / "c",
                 progress=False)
    assert _checkpoint_bytes(out)["model.safetensors"] != old["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "ck"]


def test_interrupted_rename_aside_is_reported(tmp_path):
    """If a crash hit between the two renames of the fallback path, the next run names where the old one is."""
    (tmp_path / ".ck.old-123").mkdir()
    with pytest.raises(Exception, match=r"previous checkpoint is whole at .*\.ck\.old-123"):
        output.check_out(tmp_path / "ck", overwrite=True)


def test_failed_peft_export_leaves_no_temporary_directory(tmp_path, monkeypatch):
    with pytest.raises(Crash):
        with output.atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "adapter_config.json").write_text("{}")
            raise Crash("export failed")
    assert list(tmp_path.iterdir()) == []


def test_output_files_are_flushed_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with output.atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "a.bin").write_bytes(b"x" * 10)
    assert any(p.endswith("a.bin") for p in synced)


# resume ------------------------------------------------------------------------------------------------------------

def _crashed_run(tiny_model_dir, corpus_file, tmp_path, monkeypatch, block=0, **stage):
    model = str(tiny_model_dir("llama"))
    recipe = tiny_recipe(corpus_file, param_ratio=0.5, **stage)
    _crash_after(monkeypatch, block)
    with pytest.raises(Crash):
        api.compress(model, recipe, tmp_path / "out", cache_dir=tmp_path / "c", progress=False)
    monkeypatch.setattr(pipeline, "after_block", lambda i: None)
    (run,) = (tmp_path / "c" / "runs").iterdir()
    return model, recipe, run


@pytest.mark.parametrize("target,damage,expect", [
    ("acts_1.bin", "flip", "corrupted"), ("acts_1.bin", "truncate", "truncated"),
    ("block_0.safetensors", "flip", "corrupted"), ("block_0.safetensors", "truncate", "truncated"),
    ("kwargs.pt", "flip", "corrupted"), ("block_0.json", "truncate", "unreadable")])
def test_resume_detects_damaged_cache_files(target, damage, expect, tiny_model_dir, corpus_file, tmp_path,
                                            monkeypatch):
    model, recipe, run = _crashed_run(tiny_model_dir, corpus_file, tmp_path, monkeypatch)
    path = run / target
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(Exception, match=f"{target}: .*{expect}") as err:
        api.compress(model, recipe, tmp_path / "out", resume=True, cache_dir=tmp_path / "c", progress=False)
    assert "--resume" in str(err.value) and not (tmp_path / "out").exists()


def test_resume_without_a_matching_run_exits_2(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """Another lrc version (or torch, or device) never resumes a cache it did not write: one line, exit 2."""
    model, recipe, run = _crashed_run(tiny_model_dir, corpus_file, tmp_path, monkeypatch)
    monkeypatch.setattr(pipeline, "__version__", "99.0")
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(json.dumps(recipe.model_dump(mode="json")))
    res = runner.invoke(app, ["compress", model, "--recipe", str(recipe_path), "--out", str(tmp_path / "out"),
                              "--resume", "--cache-dir", str(tmp_path / "c")])
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith("Loading")]
    assert res.exit_code == 2 and len(lines) == 1 and "no interrupted run matches" in lines[0], res.output
    assert "lrc 99.0" in lines[0] and not (tmp_path / "out").exists()
    assert run.is_dir()  # the other version's cache is left alone


def test_block_files_are_flushed_before_the_block_is_marked_done(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.basename(str(b))))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    api.compress(str(tiny_model_dir("llama")), tiny_recipe(corpus_file), tmp_path / "out", cache_dir=tmp_path / "c",
                 progress=False)
    marked = events.index(("replace", "block_1.json"))
    before = {name for kind, name in events[:marked] if kind == "fsync"}
    assert "block_1.safetensors.tmp" in before  # the result is on disk before the block counts as done
    # the next block's inputs are not forced to disk (a killed process leaves them in the page cache; after a
    # machine crash their checksum in block_1.json is checked by --resume: test_resume_detects_damaged_cache_files)
    assert "acts_2.bin" not in before


def test_cli_resume_is_byte_identical(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """`lrc compress --resume` (not only the API) continues a crashed run to the same bytes."""
    model = str(tiny_model_dir("mistral"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"calibration": {"dataset": str(corpus_file), "samples": 8, "seq_len": 32},
                                  "engine": {"device": "cpu", "batch_size": 3},
                                  "stages": [{"method": "svd-llm", "param_ratio": 0.5}]}))
    args = ["compress", model, "--recipe", str(recipe)]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "ref"), "--cache-dir", str(tmp_path / "c1")]
                         ).exit_code == 0
    _crash_after(monkeypatch, 1)
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c2")])
    assert res.exit_code != 0 and isinstance(res.exception, Crash)
    monkeypatch.setattr(pipeline, "after_block", lambda i: None)
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c2"), "--resume"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "lrc_report.json").read_text())
    assert report["resumed_from_block"] == 2
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


# half precision ----------------------------------------------------------------------------------------------------

def test_bf16_model_through_compress_resume_and_reload(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """A bf16 model (statistics in fp32/fp64, factors cast back): the checkpoint is bf16, including the residual
    paths of a compensation stage, a resumed run writes the same bytes, and the reload gives the same logits."""
    from compress import load
    from compress.recipe import parse_recipe

    model = str(tiny_model_dir("qwen2"))
    recipe = parse_recipe({"model": {"dtype": "bfloat16"},
                           "calibration": {"dataset": str(corpus_file), "samples": 8, "seq_len": 32},
                           "engine": {"device": "cpu", "batch_size": 3},
                           "stages": [{"method": "svd-llm", "param_ratio": 0.5}, {"method": "eora", "rank": 4}]})
    net, _ = api.compress(model, recipe, tmp_path / "ref", cache_dir=tmp_path / "c1", progress=False)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    _crash_after(monkeypatch, 0)
    with pytest.raises(Crash):
        api.compress(model, recipe, tmp_path / "out", cache_dir=tmp_path / "c2", progress=False)
    monkeypatch.setattr(pipeline, "after_block", lambda i: None)
    resumed, report = api.compress(model, recipe, tmp_path / "out", resume=True, cache_dir=tmp_path / "c2",
                                   progress=False)
    assert report["resumed_from_block"] == 1
    assert {p.dtype for p in resumed.parameters()} == {torch.bfloat16}
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    reloaded = load(tmp_path / "out")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 150, (2, 12))
    with torch.no_grad():
        assert torch.equal(net(ids).logits, reloaded(ids).logits)
        assert torch.isfinite(reloaded(ids).logits.float()).all()


def test_fingerprint_sees_every_weight_and_not_the_path(tiny_model_dir, tmp_path):
    """A resume (or a cached zero-shot answer) never belongs to other weights: changing one value anywhere changes
    the fingerprint; the same weights loaded from another directory keep it."""
    import shutil

    from transformers import AutoModelForCausalLM

    from compress.engine.cache import model_fingerprint

    src = tiny_model_dir("llama")
    shutil.copytree(src, tmp_path / "copy")
    a = AutoModelForCausalLM.from_pretrained(src)
    assert model_fingerprint(a) == model_fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path / "copy"))
    before = model_fingerprint(a)
    with torch.no_grad():
        a.model.embed_tokens.weight[17, 5] += 1e-3  # one value (flat 1093), off a 4096-sample stride of 3
    assert model_fingerprint(a) != before


# MoDeGPT: killed at random points of its units and of the block-influence pre-pass ---------------------------------

class _Kill(BaseException):
    """Like a SIGKILL or Ctrl-C: not an Exception, so nothing on the way may swallow it."""


def test_modegpt_killed_at_random_points_resumes_byte_identical(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """Issue 22 (4.3): MoDeGPT (mlp, qk, vo units) with the non-uniform ``block_influence`` allocator; every phase
    the run announces (calibration, capture, each block of the allocation pre-pass, and per block load, statistics
    and rebuild of the attention and of the MLP, save) and each block's end is a kill point. The pre-pass ones and
    a random third of the others are each killed once; ``resume`` must then write the uninterrupted run's
    checkpoint bytes and the same report rows."""
    import random

    from compress.progress import Progress

    model = str(tiny_model_dir("qwen2"))
    recipe = tiny_recipe(corpus_file, "modegpt", param_ratio=0.6, allocator="block_influence",
                         allocator_options={"epsilon": 0.02, "phi_max": 0.7})
    seen, real = [], Progress.phase

    def record(self, text):
        seen.append(text)
        return real(self, text)

    monkeypatch.setattr(Progress, "phase", record)
    monkeypatch.setattr(pipeline, "after_block", lambda i: seen.append(f"after block {i}"))
    _, ref_report = api.compress(model, recipe, tmp_path / "ref", cache_dir=tmp_path / "c0", progress=False,
                                 return_model=False)
    monkeypatch.undo()
    assert len({r["kept_dim"] for r in ref_report["modules"] if r["unit"] == "mlp"}) > 1  # blocks differ
    prepass = [i for i, p in enumerate(seen) if p.startswith("spectra for allocation")]
    units = [i for i, p in enumerate(seen) if p.startswith(("statistics", "rebuild"))]
    assert len(prepass) == 3 and len(units) == 3 * 4, seen
    ref = {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()  # the report's timings differ
           if p.name not in ("lrc_report.json", "lrc_modules.csv")}
    assert "model.safetensors" in ref
    rng = random.Random("kill-modegpt")
    others = [i for i in range(len(seen)) if i not in prepass]
    chosen = prepass + rng.sample(others, len(others) // 3)
    rng.shuffle(chosen)
    resumed = []

    def rows(report):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in report["modules"]]

    for k, at in enumerate(chosen):
        kill_at(monkeypatch, at, _Kill(seen[at]))
        out, cache = tmp_path / f"out{k}", tmp_path / f"c{k + 1}"
        with pytest.raises(_Kill):
            api.compress(model, recipe, out, cache_dir=cache, progress=False, return_model=False)
        assert not out.exists()
        monkeypatch.undo()
        resume = (cache / "runs").is_dir() and any((cache / "runs").iterdir())  # a user resumes if anything is there
        _, report = api.compress(model, recipe, out, resume=resume, cache_dir=cache, progress=False,
                                 return_model=False)
        for name, data in ref.items():
            assert (out / name).read_bytes() == data, (seen[at], name)
        assert rows(report) == rows(ref_report), seen[at]
        resumed.append(report["resumed_from_block"])
    assert 0 in resumed and any(0 < b < 3 for b in resumed), resumed  # from the start and from the middle
