"""The sequential scheme in one forward per batch (``engine/lockstep.py``) gives bit-identical results to the prefix
passes, runs each block once per batch, and unwinds cleanly when a decomposition fails."""
import threading

import pytest
import torch
from conftest import STORIES, needs_shared, tiny_recipe
from transformers import AutoModelForCausalLM

import compress.engine.decompose as decompose_mod
from compress.api import compress_model
from compress.engine.lockstep import Slot


def _compress(path, recipe, tmp_path, name):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calls = []
    from compress.plan import find_blocks

    for b in find_blocks(model)[1]:
        b.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    report = compress_model(model, recipe, cache_dir=tmp_path / name)
    return model, report, len(calls)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "stories260k"])
def test_one_forward_per_batch_gives_the_prefix_passes_result(arch, tiny_model_dir, corpus_file, tmp_path,
                                                            monkeypatch):
    if arch == "stories260k":
        needs_shared()
    path = STORIES if arch == "stories260k" else tiny_model_dir(arch)
    recipe = tiny_recipe(corpus_file, samples=7, seq_len=32)  # batches of 3: a short last batch too
    fast, rep_fast, calls_fast = _compress(path, recipe, tmp_path, "a")
    monkeypatch.setenv("LRC_PREFIX_PASSES", "1")
    slow, rep_slow, calls_slow = _compress(path, recipe, tmp_path, "b")
    a, b = fast.state_dict(), slow.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in rep_fast["modules"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in rep_slow["modules"]]
    n_blocks, n_batches = fast.config.num_hidden_layers, 3
    # block calls: the capture's kwargs probe, one forward that discovers the groups, one per batch; block 0 also
    # sees the capture of its inputs (its pre-hooks run before that capture stops the model's forward)
    assert calls_fast == n_blocks * (n_batches + 2) + n_batches
    assert calls_slow >= n_blocks * (4 * n_batches)  # four statistics passes and the outputs' pass
    assert not any(isinstance(m, Slot) for m in fast.modules())


def test_a_failing_decomposition_unwinds_every_waiting_forward(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    real, seen = decompose_mod.decompose, []

    def failing(method, module, stats, row, *args):
        seen.append(row.name)
        if "o_proj" in row.name:
            raise RuntimeError("injected")
        return real(method, module, stats, row, *args)

    monkeypatch.setattr(decompose_mod, "decompose", failing)
    before = threading.active_count()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()
    with pytest.raises(RuntimeError, match="injected"):
        compress_model(model, tiny_recipe(corpus_file), cache_dir=tmp_path / "c")
    assert threading.active_count() == before
    assert not any(isinstance(m, Slot) for m in model.modules())
    assert any("q_proj" in n for n in seen)  # the first group was decomposed while the forwards waited
