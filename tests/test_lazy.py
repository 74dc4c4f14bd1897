"""Lazy loading (``engine/lazy.py``) and the streamed, sharded checkpoint writer (``checkpoint/shards.py``): the
skeleton gives the eager model's logits and bytes, shards reload, and peak memory does not grow with depth."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import STORIES, needs_shared, tiny_recipe
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from compress import api
from compress.checkpoint.shards import file_source, memory_source, write_shards
from compress.engine.lazy import lazy_model


def _eager(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_skeleton_matches_the_eager_model(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    model, lazy = lazy_model(path, torch.float32)
    assert all(p.is_meta for p in lazy.blocks.parameters())  # nothing of a block is read before it is needed
    ref = _eager(path)
    assert [(k, v.shape) for k, v in lazy.state_items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in lazy.state_items())
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # blocks materialise on first use
    assert lazy.loaded == set(range(len(lazy.blocks)))
    lazy.unload_all()
    assert all(p.is_meta for p in lazy.blocks.parameters()) and not lazy.loaded


def test_skeleton_of_a_tied_real_model():
    needs_shared()
    model, lazy = lazy_model(STORIES, torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    block = lazy.load(2)
    ref = _eager(STORIES)
    assert all(torch.equal(v, ref.model.layers[2].state_dict()[k]) for k, v in block.state_dict().items())


def test_checkpoints_that_need_conversion_load_eagerly(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.legacy_name.weight"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert lazy_model(tmp_path, torch.float32) is None
    assert lazy_model(tmp_path / "missing", torch.float32) is None


def test_shards_are_what_safetensors_writes(tiny_model_dir, tmp_path):
    """One shard is byte-identical to ``save_file`` of the same tensors (mixed dtypes too); several shards hold the
    same tensors, with an index."""
    ref = _eager(tiny_model_dir("llama")).state_dict()
    ref["extra.mask"] = torch.arange(7, dtype=torch.uint8)
    ref["extra.half"] = torch.randn(3, 5).to(torch.bfloat16)
    groups = [{k: v for k, v in ref.items() if f".{i}." in k} for i in range(3)]
    groups.insert(0, {k: v for k, v in ref.items() if ".layers." not in k})
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir(), many.mkdir()
    assert write_shards(one, [memory_source(g) for g in groups]) == ["model.safetensors"]
    save_file(ref, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (one / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    layer = sum(v.numel() * v.element_size() for v in groups[1].values())
    files = write_shards(many, [memory_source(g) for g in groups], max_shard_bytes=layer)
    assert files == [f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)]
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ref.values())
    assert set(index["weight_map"]) == set(ref) and not list(many.glob(".*tmp"))
    merged = {k: v for f in files for k, v in load_file(str(many / f)).items()}
    assert merged.keys() == ref.keys() and all(torch.equal(merged[k], ref[k]) for k in ref)
    src = file_source(one / "model.safetensors", "p.")
    assert src.layout["p.extra.mask"] == (torch.uint8, (7,)) and torch.equal(src.read("p.extra.mask"), ref["extra.mask"])


def test_a_sharded_checkpoint_compresses_and_reloads(tiny_model_dir, corpus_file, tmp_path):
    """A sharded input is read lazily and a sharded output (forced by a small shard size) reloads through the
    checkpoint's remote code with the same logits as the single-file output."""
    src = _eager(tiny_model_dir("llama"))
    sharded = tmp_path / "sharded"
    src.save_pretrained(sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((tiny_model_dir("llama") / f).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    assert lazy_model(sharded, torch.float32) is not None
    recipe = tiny_recipe(corpus_file)
    a, _ = api.compress(str(sharded), recipe, tmp_path / "a", cache_dir=tmp_path / "c", progress=False)
    import compress.checkpoint.shards as shards

    old, shards.MAX_SHARD_BYTES = shards.MAX_SHARD_BYTES, 20_000
    try:
        b, _ = api.compress(str(sharded), recipe, tmp_path / "b", cache_dir=tmp_path / "c", progress=False)
    finally:
        shards.MAX_SHARD_BYTES = old
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "b").glob("model-*-of-*.safetensors"))) > 2
    ids = torch.randint(0, 200, (1, 10))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_a_missing_shard_is_named_before_any_work(tiny_model_dir, corpus_file, tmp_path):
    """A shard listed in the index but absent fails at load, naming the file, not when its block is reached."""
    src = _eager(tiny_model_dir("llama"))
    sharded = tmp_path / "sharded"
    src.save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    shards[-1].unlink()
    from compress.errors import LrcError

    with pytest.raises(LrcError, match=f"{shards[-1].name}: shard file missing"):
        lazy_model(sharded, torch.float32)
    with pytest.raises(LrcError, match="shard file missing"):
        api.compress(str(sharded), tiny_recipe(corpus_file), tmp_path / "out", cache_dir=tmp_path / "c",
                     progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "c" / "runs").exists()


def test_non_persistent_buffers_survive_a_reload(tiny_model_dir):
    """A block given back and loaded again keeps its non-persistent buffers (not in the checkpoint, so they cannot
    be read back); parameters and persistent buffers are read again from the shards."""
    model, lazy = lazy_model(tiny_model_dir("llama"), torch.float32)
    block = lazy.load(0)
    table = torch.arange(6.0)
    block.self_attn.register_buffer("table", table.clone(), persistent=False)
    want = block.mlp.down_proj.weight.detach().clone()
    lazy.unload(0)
    assert block.mlp.down_proj.weight.is_meta
    lazy.load(0)
    assert torch.equal(block.self_attn.table, table)
    assert torch.equal(block.mlp.down_proj.weight, want)


def _peak_rss_of_compress(model_dir: Path, recipe: Path, out: Path, cache: Path) -> float:
    """Peak RSS of one ``lrc compress`` process, as its report records it (its own ``VmHWM``, which the memory of
    this large test process, forked to start it, does not inflate)."""
    lrc = Path(sys.executable).with_name("lrc")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(lrc), "compress", str(model_dir), "--recipe", str(recipe), "--out", str(out),
                    "--cache-dir", str(cache)], env=env, check=True, capture_output=True)
    return json.loads((out / "lrc_report.json").read_text())["peak_rss_gib"] * 2**30


@pytest.mark.parametrize("generations", [0, None])
def test_peak_memory_does_not_grow_with_depth(tokenizer, corpus_file, tmp_path, generations):
    """Random Llamas of 8 and 32 layers, same width: the 24 extra blocks hold far more than 10% of the shallow run's
    peak RSS (checked), yet the two peaks are within 10% of each other — without sample generations, and with the
    recipe's default (``samples`` left out: 3 prompts answered by the compressed and the dense model, streamed block
    by block where the whole models would raise the peak)."""
    recipe = tmp_path / "r.yaml"
    data = tiny_recipe(corpus_file, samples=4, seq_len=32).model_dump(mode="json")
    if generations is None:
        del data["samples"]
    recipe.write_text(yaml.safe_dump(data))
    peaks, weights = {}, {}
    for layers in (8, 32):
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1024,
                          num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2,
                          max_position_embeddings=64, tie_word_embeddings=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        weights[layers] = sum(p.numel() * 4 for p in model.parameters())
        path = tmp_path / f"llama-{layers}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        del model
        peaks[layers] = _peak_rss_of_compress(path, recipe, tmp_path / f"out-{layers}", tmp_path / "cache")
        assert (tmp_path / f"out-{layers}" / "model.safetensors").is_file()
        report = json.loads((tmp_path / f"out-{layers}" / "lrc_report.json").read_text())
        if generations is None:
            assert len(report["samples"]["rows"]) == 3 and all("dense" in r for r in report["samples"]["rows"])
    assert weights[32] - weights[8] > 0.2 * peaks[8]  # an eager load would show the extra blocks
    assert abs(peaks[32] - peaks[8]) <= 0.1 * peaks[8], peaks


def test_streamed_generation_matches_the_whole_model(tiny_model_dir, tokenizer, corpus_file, tmp_path):
    """Block-by-block generation (``LazyBlocks.stream``: one decoder block in memory at a time, read again on every
    call) gives the whole model's greedy tokens, for a dense model and for an lrc checkpoint, and gives every block
    back afterwards."""
    from compress.checkpoint import load
    from compress.eval.samples import generate

    dense = tiny_model_dir("llama")
    api.compress(str(dense), tiny_recipe(corpus_file), tmp_path / "ck", cache_dir=tmp_path / "c", progress=False)
    api.compress(str(dense), tiny_recipe(corpus_file, method="modegpt", param_ratio=0.7), tmp_path / "mg",
                 cache_dir=tmp_path / "c", progress=False)
    api.compress(str(dense), tiny_recipe(corpus_file, method="cospadi", options={"iterations": 2}),
                 tmp_path / "cs", cache_dir=tmp_path / "c", progress=False)
    assert lazy_model(tmp_path / "cs", torch.float32, lrc=True) is None  # dictionary modules: loaded whole
    for path, lrc, whole in ((dense, False, _eager(dense)), (tmp_path / "ck", True, load(tmp_path / "ck")),
                             (tmp_path / "mg", True, load(tmp_path / "mg"))):
        model, lazy = lazy_model(path, torch.float32, lrc=lrc)
        lazy.stream()
        calls = []
        model.model.layers[1].register_forward_pre_hook(lambda m, a: calls.append(len(lazy.loaded)))
        assert generate(model, tokenizer, 2, max_new_tokens=6) == generate(whole, tokenizer, 2, max_new_tokens=6)
        assert calls and max(calls) <= 1  # block 0 given back before block 1 was read
        assert not lazy.loaded and all(p.is_meta for p in model.model.layers.parameters())
