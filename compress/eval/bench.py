"""``lrc bench``: the real cost of a model on this device, dense and compressed side by side in one process.

Reported per model: parameters (total, and in the decoder-block Linears), checkpoint size on disk, weight memory,
prefill tokens/s at a few sequence lengths (batch 1), decode tokens/s at batch 1 and 8 (greedy, KV cache), and peak
device memory on CUDA. The FLOP-ideal speed-up is the ratio of the Linear multiply-adds per token (decoder-block
Linears + lm_head; attention scores excluded) that the forward EXECUTES (``checkpoint/module_types.py``): what a
perfectly efficient kernel would gain.

Protocol (timings on a shared machine drift by tens of percent between minutes; a ratio of two runs taken seconds
apart drifts much less): the number of torch threads is pinned (``threads``; reported); per measurement every model
runs once as warm-up (not timed: first-call allocations, lazily built caches, lrc's fusion groups), then ``repeats``
rounds (7 by default) time every model once, the order rotating between rounds; the garbage collector is held off
during a timed run. A model's tokens/s is the median over rounds. The measured speed-up of a model over the reference
is computed per round (reference time / model time, both timed back to back), so each round gives one ratio; reported
are their median and spread (min, quartiles, max), and the fraction of the FLOP-ideal the median reaches.
"""
from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch

from ..checkpoint.module_types import stored_weights, unit_weights
from ..models import load_model
from ..plan import find_blocks, linear_units
from ..report import unique_parameters

def block_linear_params(model) -> int:
    """Weights of every Linear-like unit inside the decoder blocks (``checkpoint/module_types.py``: a LowRankLinear
    counts as its two factors), biases excluded."""
    _, blocks = find_blocks(model)
    units = {id(m): m for block in blocks for _, m in linear_units(block)}  # a shared module counts once
    return sum(unit_weights(m) for m in units.values())


def linear_macs_per_token(model) -> int:
    head = model.get_output_embeddings()
    return block_linear_params(model) + (unit_weights(head) if head is not None else 0)  # a quantized head too


def disk_bytes(path: str | None) -> int | None:
    if not path or not Path(path).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, device) -> float:
    _sync(device)
    enabled = gc.isenabled()
    gc.disable()
    try:
        t = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t
    finally:
        if enabled:
            gc.enable()


def _workloads(seq_lens, decode_batches, decode_tokens: int, vocab: int, device) -> list:
    """``(key, kind, size, work tokens, fn(model))`` per measurement, on fixed random inputs (seed 0)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for L in seq_lens:
        x = torch.randint(0, vocab, (1, L), generator=g).to(device)
        out.append((f"prefill@{L}", "prefill_tokens_per_s", L, L, lambda m, x=x: m(x, use_cache=False)))
    for b in decode_batches:
        prompt = torch.randint(0, vocab, (b, 16), generator=g).to(device)
        out.append((f"decode@b{b}", "decode_tokens_per_s", b, b * decode_tokens, lambda m, p=prompt: m.generate(
            p, attention_mask=torch.ones_like(p), max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
            do_sample=False, pad_token_id=0)))
    return out


def spread(values: list[float]) -> dict:
    """``{median, min, q1, q3, max, n}`` of per-round ratios (quartiles inclusive of the extremes)."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "min": min(values), "q1": q1, "q3": q3, "max": max(values),
            "n": len(values)}


@torch.no_grad()
def measure_side_by_side(models: dict, seq_lens=(128, 512), decode_batches=(1, 8), decode_tokens: int = 32,
                         repeats: int = 7, vocab: int | None = None) -> tuple[dict, dict]:
    """Tokens/s of every model in ``models`` (role -> model) on the same inputs, runs INTERLEAVED (module docstring).
    Returns ``({role: {prefill_tokens_per_s, decode_tokens_per_s, times_s}}, {role: {key: [per-round ratio]}})``:
    ``times_s[key]`` are the timed runs in seconds, a ratio is the first role's time over the role's in the same
    round (every role but the first)."""
    roles = list(models)
    device = next(models[roles[0]].parameters()).device
    vocab = vocab or min(m.config.vocab_size for m in models.values())
    out = {r: {"prefill_tokens_per_s": {}, "decode_tokens_per_s": {}, "times_s": {}} for r in roles}
    for key, kind, size, work, fn in _workloads(seq_lens, decode_batches, decode_tokens, vocab, device):
        for r in roles:
            fn(models[r])  # warm-up, not timed
        times = {r: [] for r in roles}
        for i in range(repeats):
            order = roles[i % len(roles):] + roles[:i % len(roles)]
            for r in (order if i % 2 == 0 else order[::-1]):
                gc.collect()
                times[r].append(_seconds(lambda: fn(models[r]), device))
        for r in roles:
            out[r][kind][size] = work / statistics.median(times[r])
            out[r]["times_s"][key] = times[r]
    first = out[roles[0]]["times_s"]
    ratios = {r: {key: [a / b for a, b in zip(first[key], t)] for key, t in out[r]["times_s"].items()}
              for r in roles[1:]}
    return out, ratios


def measure(model, seq_lens=(128, 512), decode_batches=(1, 8), decode_tokens: int = 32, repeats: int = 7,
            vocab: int | None = None) -> dict:
    """Tokens/s of one model (``measure_side_by_side`` with one role)."""
    out = measure_side_by_side({"model": model}, seq_lens, decode_batches, decode_tokens, repeats, vocab)[0]["model"]
    device = next(model.parameters()).device
    if device.type == "cuda":
        out["peak_device_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def quant_paths(model) -> tuple[dict, int]:
    """After a run: how many quantized matrices took each forward path (``QuantLinear.kernel``: ``int4_cpu``,
    ``int8``, ``dequantized``), and the bytes of what those paths keep beside the codes (a packed kernel layout,
    or the dequantized weight)."""
    paths: dict = {}
    held = 0
    for m in model.modules():
        cache = getattr(m, "_cache", None)
        if isinstance(cache, dict) and hasattr(m, "kernel"):
            for key, tensors in cache.items():
                paths[key[0]] = paths.get(key[0], 0) + 1
                held += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return paths, held


def describe(model, path: str | None) -> dict:
    """A model's counts after its timed runs: parameters, checkpoint bytes, weights stored (parameters and codes)
    and weights at run time (plus what the quantized matrices' forward paths keep: ``quant_paths``)."""
    params = unique_parameters(model)
    codes = [b for m in model.modules() if hasattr(m, "stored_weights") for b in m.buffers()]  # quantized weights
    stored = sum(t.numel() * t.element_size() for t in (*params, *codes))
    paths, held = quant_paths(model)
    return {"params_total": sum(p.numel() for p in params) + stored_weights(model),
            "params_block_linears": block_linear_params(model),
            "linear_macs_per_token": linear_macs_per_token(model),
            "weights_gib": stored / 2**30, "run_weights_gib": (stored + held) / 2**30, "quant_paths": paths,
            "checkpoint_bytes": disk_bytes(path)}


def speedups(reference: dict, model: dict, ratios: dict) -> dict:
    """The comparison of ``model`` with ``reference`` (``describe`` dicts): FLOP-ideal speed-up, and per measurement
    the measured speed-up's ``spread`` and the fraction of the FLOP-ideal its median reaches."""
    ideal = reference["linear_macs_per_token"] / model["linear_macs_per_token"]
    measured = {k: spread(v) for k, v in ratios.items()}
    return {"flop_ideal_speedup": ideal, "measured_speedup": {k: v["median"] for k, v in measured.items()},
            "speedup_spread": measured,
            "fraction_of_ideal": {k: v["median"] / ideal for k, v in measured.items()}}


def run_bench(model_spec: str, reference: str | None = None, seq_lens=(128, 512), decode_batches=(1, 8),
              decode_tokens: int = 32, repeats: int = 7, device: str = "auto", dtype: str = "float32",
              threads: int | None = None) -> dict:
    """Measure MODEL (and REFERENCE, in the same process, on the same inputs) with ``eval.bench``'s protocol,
    both loaded in ``dtype`` (``bfloat16`` runs 4-bit matrices on the int4 CPU kernel). ``threads``: torch's
    intra-op threads for the whole run (default: the current number, pinned)."""
    from ..engine.device import resolve_device

    dev = resolve_device(device)
    torch.set_num_threads(threads or torch.get_num_threads())
    results = {"device": str(dev), "dtype": dtype, "torch_threads": torch.get_num_threads(), "repeats": repeats,
               "decode_tokens": decode_tokens, "interleaved": True, "models": {}}
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
        results.update(speedups(results["models"]["reference"], results["models"]["model"], ratios["model"]))
    return results


def bench_table(results: dict):
    from rich.table import Table

    models = results["models"]
    table = Table(title=f"lrc bench on {results['device']}, {results.get('dtype', 'float32')} "
                        f"({results['torch_threads']} threads, interleaved runs, "
                        f"median of {results['repeats']}; speed-ups per round: median \\[min-max])")
    table.add_column("")
    for role in models:
        table.add_column(f"{role}: {models[role]['name']}")
    first = next(iter(models.values()))
    rows = [("params (total)", lambda d: f"{d['params_total']:,}"),
            ("params (block Linears)", lambda d: f"{d['params_block_linears']:,}"),
            ("checkpoint on disk", lambda d: f"{d['checkpoint_bytes'] / 2**20:.1f} MiB" if d["checkpoint_bytes"]
             else "–"),
            ("weights stored", lambda d: f"{d['weights_gib']:.3f} GiB"),
            ("weights at run time", lambda d: f"{d.get('run_weights_gib', d['weights_gib']):.3f} GiB")]
    if any(d.get("quant_paths") for d in models.values()):
        rows.append(("quantized matrices' paths", lambda d: ", ".join(f"{k} {v}" for k, v in
                                                                      sorted(d.get("quant_paths", {}).items()))
                     or "–"))
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
        for k, v in results["speedup_spread"].items():
            table.add_row(f"measured speed-up {k}", "", f"{format_spread(v)}, "
                                                        f"{results['fraction_of_ideal'][k]:.0%} of ideal")
    return table


def format_spread(v: dict) -> str:
    """``1.083x [1.050-1.102]``: the median ratio and its range over the rounds."""
    return f"{v['median']:.3f}x [{v['min']:.3f}-{v['max']:.3f}]"
