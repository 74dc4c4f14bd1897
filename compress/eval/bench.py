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
from torch import nn

from ..plan import find_blocks
from ..report import unique_parameters


def block_linear_params(model) -> int:
    """Weights of every Linear inside the decoder blocks (a LowRankLinear counts as its two factor Linears)."""
    _, blocks = find_blocks(model)
    return sum(m.weight.numel() for m in blocks.modules() if isinstance(m, nn.Linear))


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
