"""``lrc bench``: the real cost of a model on this device, dense and compressed side by side in one process.

Reported per model: parameters (total, and in the decoder-block Linears), checkpoint size on disk, weight memory,
prefill tokens/s at a few sequence lengths (batch 1), decode tokens/s at batch 1 and 8 (greedy, KV cache), each the
median of ``repeats`` timed runs after one warm-up, and peak device memory on CUDA. The FLOP-ideal speed-up is the
ratio of the Linear multiply-adds per token (decoder-block Linears + lm_head; attention scores excluded), what a
perfectly efficient kernel would gain.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..checkpoint.units import unit_weights
from ..models import load_model
from ..plan import find_blocks, linear_units
from ..report import unique_parameters


def block_linear_params(model) -> int:
    """Weights of every Linear-like unit inside the decoder blocks (``checkpoint/units.py``: a LowRankLinear counts
    as its two factors), biases excluded."""
    _, blocks = find_blocks(model)
    units = {id(m): m for block in blocks for _, m in linear_units(block)}  # a shared module counts once
    return sum(unit_weights(m) for m in units.values())


def linear_macs_per_token(model) -> int:
    head = model.get_output_embeddings()
    return block_linear_params(model) + (head.weight.numel() if head is not None else 0)


def disk_bytes(path: str | None) -> int | None:
    if not path or not Path(path).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def measure(model, seq_lens=(128, 512), decode_batches=(1, 8), decode_tokens: int = 32, repeats: int = 5,
            vocab: int | None = None) -> dict:
    device = next(model.parameters()).device
    vocab = vocab or model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    out = {"prefill_tokens_per_s": {}, "decode_tokens_per_s": {}}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for L in seq_lens:
        x = torch.randint(0, vocab, (1, L), generator=g).to(device)
        s = _median_seconds(lambda: model(x, use_cache=False), device, repeats)
        out["prefill_tokens_per_s"][L] = L / s
    for b in decode_batches:
        prompt = torch.randint(0, vocab, (b, 16), generator=g).to(device)

        def run():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=decode_tokens,
                           min_new_tokens=decode_tokens, do_sample=False, pad_token_id=0)

        s = _median_seconds(run, device, repeats)
        out["decode_tokens_per_s"][b] = b * decode_tokens / s
    if device.type == "cuda":
        out["peak_device_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def describe(model, path: str | None) -> dict:
    params = unique_parameters(model)
    return {"params_total": sum(p.numel() for p in params), "params_block_linears": block_linear_params(model),
            "linear_macs_per_token": linear_macs_per_token(model),
            "weights_gib": sum(p.numel() * p.element_size() for p in params) / 2**30,
            "checkpoint_bytes": disk_bytes(path)}


def run_bench(model_spec: str, reference: str | None = None, seq_lens=(128, 512), decode_batches=(1, 8),
          decode_tokens: int = 32, repeats: int = 5, device: str = "auto", dtype: str = "float32") -> dict:
    """Measure MODEL (and REFERENCE, in the same process, on the same inputs) with ``eval.bench``."""
    from ..engine.pipeline import resolve_device

    dev = resolve_device(device)
    results = {"device": str(dev), "torch_threads": torch.get_num_threads(), "repeats": repeats,
               "decode_tokens": decode_tokens, "models": {}}
    for role, spec in (("reference", reference), ("model", model_spec)):
        if spec is None:
            continue
        model, _, path = load_model(spec, dtype)
        model.to(dev)
        results["models"][role] = {"name": spec, **describe(model, path),
                                   **measure(model, seq_lens, decode_batches, decode_tokens, repeats)}
        del model
    if reference:
        m, r = results["models"]["model"], results["models"]["reference"]
        results["flop_ideal_speedup"] = r["linear_macs_per_token"] / m["linear_macs_per_token"]
        results["measured_speedup"] = {
            f"prefill@{L}": m["prefill_tokens_per_s"][L] / r["prefill_tokens_per_s"][L] for L in seq_lens}
        results["measured_speedup"].update({
            f"decode@b{b}": m["decode_tokens_per_s"][b] / r["decode_tokens_per_s"][b] for b in decode_batches})
    return results


def bench_table(results: dict):
    from rich.table import Table

    models = results["models"]
    table = Table(title=f"lrc bench on {results['device']} ({results['torch_threads']} threads, median of "
                        f"{results['repeats']})")
    table.add_column("")
    for role in models:
        table.add_column(f"{role}: {models[role]['name']}")
    first = next(iter(models.values()))
    rows = [("params (total)", lambda d: f"{d['params_total']:,}"),
            ("params (block Linears)", lambda d: f"{d['params_block_linears']:,}"),
            ("checkpoint on disk", lambda d: f"{d['checkpoint_bytes'] / 2**20:.1f} MiB" if d["checkpoint_bytes"]
             else "–"),
            ("weights in memory", lambda d: f"{d['weights_gib']:.3f} GiB")]
    rows += [(f"prefill tok/s @ {L}", lambda d, L=L: f"{d['prefill_tokens_per_s'][L]:.0f}")
             for L in first["prefill_tokens_per_s"]]
    rows += [(f"decode tok/s @ batch {b}", lambda d, b=b: f"{d['decode_tokens_per_s'][b]:.1f}")
             for b in first["decode_tokens_per_s"]]
    if "peak_device_memory_gib" in first:
        rows.append(("peak device memory", lambda d: f"{d['peak_device_memory_gib']:.2f} GiB"))
    for label, fmt in rows:
        table.add_row(label, *(fmt(d) for d in models.values()))
    if "flop_ideal_speedup" in results:
        table.add_row("FLOP-ideal speed-up", "", f"{results['flop_ideal_speedup']:.3f}x")
        for k, v in results["measured_speedup"].items():
            table.add_row(f"measured speed-up {k}", "", f"{v:.3f}x")
    return table
