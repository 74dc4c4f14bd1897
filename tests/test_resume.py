"""Interrupt after block k, resume, and get a byte-identical checkpoint."""
import json

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


# shared dictionaries (CoSpaDi share: layers): the cross-block wait ---------------------------------------------------

def _cospadi_shared(corpus_file, group_size):
    return tiny_recipe(corpus_file, "cospadi", param_ratio=0.6,
                       options={"iterations": 2, "share": "layers", "group_size": group_size})


def _crash_at_save(monkeypatch, n: int, calls: list):
    """Raise before the ``n``-th call (1-based) of ``RunCache.save_block`` writes anything; ``calls`` records
    the block of each call."""
    from compress.engine.cache import RunCache

    real = RunCache.save_block

    def save_block(self, i, tensors, info):
        calls.append(i)
        if len(calls) == n:
            raise Crash(f"injected failure before save {n} (block {i})")
        return real(self, i, tensors, info)

    monkeypatch.setattr(RunCache, "save_block", save_block)


@pytest.mark.parametrize("group_size,crash_at,blocks,resumed", [
    (2, 3, [0, 0, 1], 1),  # block 0 saved dense, saved again holding DictLinear; crash before block 1 is saved
    (3, 4, [0, 1, 0, 1], 2),  # group 0-2: block 0 saved again, block 1 still dense on disk; crash before its re-save
    (3, 5, [0, 1, 0, 1, 2], 2),  # blocks 0 and 1 saved again; crash before block 2 (the group's last) is saved
])
def test_shared_group_resume_after_crash_between_the_group_saves(group_size, crash_at, blocks, resumed,
                                                                 tiny_model_dir, corpus_file, tmp_path,
                                                                 monkeypatch):
    """Issue 22 (3): when a shared group's last block is reached, the group's earlier blocks are saved again with
    their DictLinear modules before the last block is saved; a crash in between leaves blocks on disk that already
    hold DictLinear (no ``.weight``). The resume refits the group and writes the same bytes as a run never
    interrupted."""
    model = str(tiny_model_dir("llama"))
    recipe = _cospadi_shared(corpus_file, group_size)
    api.compress(model, recipe, tmp_path / "ref", cache_dir=tmp_path / "c1", progress=False)
    calls: list = []
    _crash_at_save(monkeypatch, crash_at, calls)
    with pytest.raises(Crash):
        api.compress(model, recipe, tmp_path / "out", cache_dir=tmp_path / "c2", progress=False)
    assert calls == blocks
    monkeypatch.undo()
    _, report = api.compress(model, recipe, tmp_path / "out", resume=True, cache_dir=tmp_path / "c2",
                             progress=False)
    assert report["resumed_from_block"] == resumed
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    ref = json.loads((tmp_path / "ref" / "lrc_report.json").read_text())
    out = json.loads((tmp_path / "out" / "lrc_report.json").read_text())
    assert sorted(r["name"] for r in out["modules"]) == sorted(r["name"] for r in ref["modules"])


def _kill_points(monkeypatch, kill_at: int | None, events: list):
    """Number every durable step of the run cache: before each atomic file write (a shared group's statistics, a
    block's weights), after each block is marked finished (its stashed statistics not yet removed), and after each
    block (``after_block``); raise ``Crash`` at step ``kill_at`` (1-based; None: only count into ``events``)."""
    from compress.engine import cache as cache_mod

    real_write, real_save = cache_mod.save_tensors, cache_mod.RunCache.save_block

    def step(what):
        events.append(what)
        if len(events) == kill_at:
            raise Crash(f"injected kill at step {kill_at}: {what}")

    def write(path, tensors):
        step(f"write {path.name}")
        return real_write(path, tensors)

    def save_block(self, i, tensors, info):
        real_save(self, i, tensors, info)
        step(f"block {i} marked finished")

    monkeypatch.setattr(cache_mod, "save_tensors", write)
    monkeypatch.setattr(cache_mod.RunCache, "save_block", save_block)
    monkeypatch.setattr(pipeline, "after_block", lambda i: step(f"after block {i}"))


@pytest.mark.parametrize("group_size", [2, 3])
def test_shared_dictionaries_resume_from_random_kill_points(group_size, tiny_model_dir, corpus_file, tmp_path,
                                                            monkeypatch):
    """Issue 22 (4.3): CoSpaDi with dictionaries shared across blocks (the one cross-block wait), killed at random
    durable steps of the run (seeded draws), resumes to the bytes of a run never interrupted."""
    import random
    import shutil

    model = str(tiny_model_dir("llama"))
    recipe = _cospadi_shared(corpus_file, group_size)
    events: list = []
    _kill_points(monkeypatch, None, events)
    api.compress(model, recipe, tmp_path / "ref", cache_dir=tmp_path / "c0", progress=False)
    monkeypatch.undo()
    assert sum(e.startswith("write shared-") for e in events) == (21 if group_size == 3 else 14)
    # two steps anywhere, one in the cross-block window: from the group's last statistics to its last block's save
    rng = random.Random(22 + group_size)
    last_stash = max(k for k, e in enumerate(events, 1) if e.startswith("write shared-"))
    done = events.index(f"block {group_size - 1} marked finished", last_stash) + 1
    picks = sorted({*rng.sample(range(1, len(events) + 1), 2), rng.choice(range(last_stash + 1, done + 1))})
    for n, kill_at in enumerate(picks):
        cache_dir = tmp_path / f"c{n + 1}"
        seen: list = []
        _kill_points(monkeypatch, kill_at, seen)
        with pytest.raises(Crash):
            api.compress(model, recipe, tmp_path / "out", cache_dir=cache_dir, progress=False)
        monkeypatch.undo()
        assert seen == events[:kill_at] and not (tmp_path / "out").exists()
        api.compress(model, recipe, tmp_path / "out", resume=True, cache_dir=cache_dir, progress=False)
        for name in ("model.safetensors", "config.json"):
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), \
                (kill_at, events[kill_at - 1], name)
        shutil.rmtree(tmp_path / "out")


def test_shared_group_resume_after_a_crash_inside_the_second_save_of_a_block(tiny_model_dir, corpus_file, tmp_path,
                                                                             monkeypatch):
    """Killed after block 0's new weights were written but before its new record was: the second save is staged
    beside the old files (``block_0.next.*``) and committed by the rename of its record, so the resume finds block 0
    whole (the old, dense one) and gives the uninterrupted run's checkpoint."""
    from compress.engine import cache as cache_mod

    model = str(tiny_model_dir("llama"))
    recipe = _cospadi_shared(corpus_file, 2)
    api.compress(model, recipe, tmp_path / "ref", cache_dir=tmp_path / "c1", progress=False)
    real_write, writes = cache_mod.save_tensors, []

    def write(path, tensors):
        real_write(path, tensors)
        writes.append(path.name.startswith("block_0."))
        if sum(writes) == 2:  # block 0's weights saved again, its JSON not yet
            raise Crash("injected kill inside the second save of block 0")

    monkeypatch.setattr(cache_mod, "save_tensors", write)
    with pytest.raises(Crash):
        api.compress(model, recipe, tmp_path / "out", cache_dir=tmp_path / "c2", progress=False)
    monkeypatch.undo()
    api.compress(model, recipe, tmp_path / "out", resume=True, cache_dir=tmp_path / "c2", progress=False)
    ref = (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == ref
