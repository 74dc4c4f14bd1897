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


def _seconds(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _workloads(seq_lens, decode_batches, decode_tokens: int, vocab: int, device) -> list:
    """``(kind, size, work tokens, fn(model))`` per measurement, on fixed random inputs (seed 0)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for L in seq_lens:
        x = torch.randint(0, vocab, (1, L), generator=g).to(device)
        out.append(("prefill_tokens_per_s", L, L, lambda m, x=x: m(x, use_cache=False)))
    for b in decode_batches:
        prompt = torch.randint(0, vocab, (b, 16), generator=g).to(device)
        out.append(("decode_tokens_per_s", b, b * decode_tokens, lambda m, p=prompt: m.generate(
            p, attention_mask=torch.ones_like(p), max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
            do_sample=False, pad_token_id=0)))
    return out


@torch.no_grad()
def measure_side_by_side(models: dict, seq_lens=(128, 512), decode_batches=(1, 8), decode_tokens: int = 32,
                         repeats: int = 5, vocab: int | None = None) -> tuple[dict, dict]:
    """Tokens/s of every model in ``models`` (role -> model) on the same inputs, runs INTERLEAVED: for each
    measurement one warm-up each, then ``repeats`` rounds that time every model once (the order alternating between
    rounds), so a machine whose speed drifts (other tenants, clocks) slows every model alike. Returns
    ``({role: {prefill_tokens_per_s, decode_tokens_per_s}}, {key: [per-round time ratio first role / role]})``."""
    roles = list(models)
    device = next(models[roles[0]].parameters()).device
    vocab = vocab or min(m.config.vocab_size for m in models.values())
    out = {r: {"prefill_tokens_per_s": {}, "decode_tokens_per_s": {}} for r in roles}
    ratios: dict = {}
    for kind, size, work, fn in _workloads(seq_lens, decode_batches, decode_tokens, vocab, device):
        for r in roles:
            fn(models[r])  # warm-up
        times = {r: [] for r in roles}
        for i in range(repeats):
            for r in (roles if i % 2 == 0 else roles[::-1]):
                times[r].append(_seconds(lambda: fn(models[r]), device))
        for r in roles:
            out[r][kind][size] = work / statistics.median(times[r])
        key = f"{kind.split('_')[0]}@{'' if kind.startswith('prefill') else 'b'}{size}"
        ratios[key] = [a / b for a, b in zip(times[roles[0]], times[roles[-1]])]
    return out, ratios


def measure(model, seq_lens=(128, 512), decode_batches=(1, 8), decode_tokens: int = 32, repeats: int = 5,
            vocab: int | None = None) -> dict:
    """Tokens/s of one model (``measure_side_by_side`` with one role)."""
    out = measure_side_by_side({"model": model}, seq_lens, decode_batches, decode_tokens, repeats, vocab)[0]["model"]
    device = next(model.parameters()).device
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
    models, paths = {}, {}
    for role, spec in (("reference", reference), ("model", model_spec)):
        if spec is not None:
            models[role], _, paths[role] = load_model(spec, dtype)
            models[role].to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    speeds, ratios = measure_side_by_side(models, seq_lens, decode_batches, decode_tokens, repeats)
    for role, model in models.items():
        results["models"][role] = {"name": reference if role == "reference" else model_spec,
                                   **describe(model, paths[role]), **speeds[role]}
    if dev.type == "cuda":  # both models are resident: the peak is the pair's
        results["peak_device_memory_gib_both"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if reference:
        m, r = results["models"]["model"], results["models"]["reference"]
        results["flop_ideal_speedup"] = r["linear_macs_per_token"] / m["linear_macs_per_token"]
        # median over rounds of (reference time / model time), each round timing both back to back
        results["measured_speedup"] = {k: statistics.median(v) for k, v in ratios.items()}
        results["interleaved"] = True
    return results


def bench_table(results: dict):
    from rich.table import Table

    models = results["models"]
    table = Table(title=f"lrc bench on {results['device']} ({results['torch_threads']} threads, interleaved runs, "
                        f"median of {results['repeats']})")
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
