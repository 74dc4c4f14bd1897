"""The CUDA path: compression, the streamed Fisher pass and sensitivity sweep, evaluation, bench and the fast
inference path on a GPU give what they give on the CPU. Marked ``gpu``: skipped where torch sees no CUDA device
(``conftest.pytest_collection_modifyitems``). ``LRC_TEST_DEVICE=cpu pytest -m gpu`` runs the same checks on the
CPU against itself, to test the tests where no GPU exists."""
import os

import pytest
import torch

import compress
from compress import api
from compress.checkpoint.modeling_lrc import set_fast_path
from compress.engine.cache import RunCache
from compress.engine.gradients import fisher_sums, fisher_sums_streamed
from compress.engine.lazy import lazy_model
from compress.engine.stream import Host
from compress.plan import find_blocks
from conftest import tiny_recipe

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("LRC_TEST_DEVICE", "cuda")
X = torch.randint(3, 150, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, device):
    with torch.no_grad():
        return model.to(device)(X.to(device)).logits.float().cpu()


def _recipe(corpus_file, device, **stage):
    recipe = tiny_recipe(corpus_file, **stage)
    recipe.engine.device = device
    return recipe


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_compress_on_the_gpu_matches_the_cpu(tiny_model_dir, corpus_file, tmp_path, arch):
    """svd-llm on the device and on the CPU: the same ranks, logits of the two checkpoints within float tolerance."""
    (cpu_model, cpu_report), (dev_model, dev_report) = (
        api.compress(str(tiny_model_dir(arch)), _recipe(corpus_file, device), tmp_path / f"out-{k}",
                     cache_dir=tmp_path / f"cache-{k}", progress=False) for k, device in enumerate(("cpu", DEVICE)))
    assert [m["rank"] for m in cpu_report["modules"]] == [m["rank"] for m in dev_report["modules"]]
    assert torch.allclose(_logits(dev_model, DEVICE), _logits(cpu_model, "cpu"), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("method, allocator", [("fwsvd", "uniform"), ("asvd", "sensitivity")])
def test_whole_model_passes_run_streamed_on_the_gpu(tiny_model_dir, corpus_file, tmp_path, method, allocator,
                                                    monkeypatch):
    """FWSVD (Fisher pass) and ASVD's sensitivity sweep end to end on the device, lazily loaded: same ranks as the
    CPU, and the model's own forward never runs whole on the device (the blocks stream)."""
    stage = {"method": method, "allocator": allocator}
    if allocator == "sensitivity":
        stage["allocator_options"] = {"ratios": [0.3, 0.6, 0.9], "samples": 2}
    ranks = []
    for k, device in enumerate(("cpu", DEVICE)):
        monkeypatch.setenv("LRC_CACHE", str(tmp_path / f"lrc-{k}"))  # no sweep table shared between the two
        report = api.compress(str(tiny_model_dir("llama")), _recipe(corpus_file, device, **stage), tmp_path / f"out-{k}",
                              cache_dir=tmp_path / f"cache-{k}", progress=False, return_model=False)[1]
        ranks.append([m["rank"] for m in report["modules"]])
    assert ranks[0] == ranks[1] and len(set(ranks[0])) > (allocator == "sensitivity")


def test_streamed_fisher_on_the_gpu_equals_the_cpu_reference(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("qwen2")
    dense = AutoModelForCausalLM.from_pretrained(path).float().eval()
    ids = torch.randint(3, dense.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    ref = fisher_sums(dense, ids, names, torch.device("cpu"))
    model, lazy = lazy_model(path, torch.float32)
    prefix, blocks = find_blocks(model)
    got = fisher_sums_streamed(model, prefix, blocks, ids, names, Host(blocks, DEVICE, lazy),
                               RunCache(tmp_path, "fisher-gpu", False), batch_size=2)
    for key, value in ref.items():
        assert torch.allclose(got[key], value, rtol=1e-3, atol=1e-10), key
    assert not lazy.loaded


def test_eval_and_bench_on_the_gpu(tiny_model_dir, corpus_file, tmp_path):
    """``lrc eval --device`` gives the CPU's perplexity; ``lrc bench --device`` measures there (peak memory on CUDA)."""
    from compress.eval.bench import run_bench
    from compress.eval.run import evaluate
    from compress.recipe import EvalConfig

    api.compress(str(tiny_model_dir("llama")), tiny_recipe(corpus_file), tmp_path / "ckpt",
                 cache_dir=tmp_path / "cache", progress=False, return_model=False)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(corpus_file.read_text().split()[:3000]))
    cfg = EvalConfig(ppl=[str(text)], seq_len=32, max_windows=8)
    ppl = {d: evaluate(str(tmp_path / "ckpt"), cfg, device=d)["perplexity"][str(text)]["perplexity"]
           for d in ("cpu", DEVICE)}
    assert ppl[DEVICE] == pytest.approx(ppl["cpu"], rel=1e-4)
    res = run_bench(str(tmp_path / "ckpt"), str(tiny_model_dir("llama")), seq_lens=(16,), decode_batches=(1,),
                    decode_tokens=4, repeats=1, device=DEVICE)
    assert res["device"].startswith(DEVICE) and res["flop_ideal_speedup"] > 1
    assert ("peak_device_memory_gib_both" in res) == (DEVICE == "cuda")


def test_fast_path_on_the_gpu(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """Fused q/k/v and gate/up first factors on the device give the plain forward's logits and greedy tokens."""
    from compress.checkpoint import lrc_fast

    monkeypatch.setattr(lrc_fast, "FUSE_MIN_ROWS", 1)
    api.compress(str(tiny_model_dir("mistral")), tiny_recipe(corpus_file, param_ratio=0.5), tmp_path / "ckpt",
                 cache_dir=tmp_path / "cache", progress=False, return_model=False)
    fast = compress.load(tmp_path / "ckpt").to(DEVICE)
    plain = set_fast_path(compress.load(tmp_path / "ckpt"), fast=False, layout=False).to(DEVICE)
    assert torch.allclose(_logits(fast, DEVICE), _logits(plain, DEVICE), atol=1e-4)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(X).to(DEVICE))
    with torch.no_grad():
        assert torch.equal(fast.generate(X.to(DEVICE), **kwargs), plain.generate(X.to(DEVICE), **kwargs))
