"""Block refinement anchored to the dense block (AA-SVD, arXiv 2604.02119, §3.3; methods.md §13).

After every stage has compressed block i, its parameters are trained to reproduce the *dense* block's outputs on the
*dense* model's inputs from the inputs the compressed model now gives it:

    min_θ  mean ‖block_θ(Ĥ_in) − block_dense(H_in)‖²       (Ĥ: the compressed stream, H: the dense stream)

with AdamW, a linear warm-up then a cosine decay to ``min_lr`` × lr, and gradient-norm clipping; the block's outputs
are then recomputed from the refined block, so the next block sees the refined one (the engine's propagation). Only
this block, its optimizer state and mini-batches of the two cached streams are in memory. The mini-batch order is
seeded per block, so a resumed run refines exactly as an uninterrupted one.

lrc keeps the refined parameters only when they lower the block's MSE over all calibration sequences (the
paper's objective, measured before and after in evaluation mode): refinement never makes a block worse on its own
data, and the report records both numbers per block.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from .stream import hidden


def trainable(block: nn.Module, what: str, norms: bool, replaced: set[str] = frozenset()) -> list[nn.Parameter]:
    """The parameters refinement trains: every parameter of the block (``all``, AA-SVD's choice) or only those of
    the modules lrc rebuilt (``lrc``: ``replaced``, names relative to the block: factors, dictionaries, resized
    Linears), the norms' weights included with ``norms`` (excluded without, in either mode)."""
    norm_ids = {id(p) for m in block.modules() if "norm" in type(m).__name__.lower()
                for p in m.parameters(recurse=False)}
    ours = {id(p) for n, m in block.named_modules() if n in replaced for p in m.parameters()}
    return [p for p in block.parameters() if p.is_floating_point() and (
        (norms if id(p) in norm_ids else what == "all" or id(p) in ours))]


def _schedule(step: int, steps: int, warmup: int, min_lr: float) -> float:
    """Multiplier of the learning rate: linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_lr``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@torch.no_grad()
def block_mse(block, x, target, kwargs, batch_size: int, device) -> float:
    """Mean squared error of ``block(x)`` against ``target`` over every sequence (float64 sums)."""
    total, count = 0.0, 0
    for s in range(0, x.shape[0], batch_size):
        y = hidden(block(x[s:s + batch_size].to(device, _dtype(block)), **kwargs))[0]
        t = target[s:s + batch_size].to(device, y.dtype)
        total += float((y.double() - t.double()).pow(2).sum())
        count += t.numel()
    return total / max(count, 1)


def _dtype(block) -> torch.dtype:
    return next(p.dtype for p in block.parameters() if p.is_floating_point())


def refine_block(block: nn.Module, x: torch.Tensor, target: torch.Tensor, kwargs: dict, config, index: int,
                 device, replaced: set[str] = frozenset(), progress=None) -> dict:
    """Train ``block`` in place so ``block(x)`` approaches ``target`` (the dense block's outputs on the dense
    inputs); ``config``: ``recipe.RefineConfig``; ``replaced``: the modules lrc rebuilt (``train: lrc``). Returns the block's report: MSE before and after, steps, seconds,
    whether the refined parameters were kept."""
    t0 = time.perf_counter()
    params = trainable(block, config.train, config.norms, set(replaced))
    eval_bs = max(config.batch_size, 1)
    before = block_mse(block, x, target, kwargs, eval_bs, device)
    if not params or config.steps == 0:
        return {"block": index, "mse_before": before, "mse_after": before, "steps": 0, "kept": False,
                "params": 0, "seconds": round(time.perf_counter() - t0, 3)}
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in block.parameters()]
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, round(config.warmup * config.steps))
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    n, order, pos = x.shape[0], torch.empty(0, dtype=torch.long), 0
    dtype = _dtype(block)
    was_training = block.training
    block.train()
    try:
        for step in range(config.steps):
            if pos + config.batch_size > order.numel():  # a new pass over the sequences, freshly shuffled
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + config.batch_size]
            pos += config.batch_size
            for g in opt.param_groups:
                g["lr"] = config.lr * _schedule(step, config.steps, warmup, config.min_lr)
            with torch.enable_grad():
                y = hidden(block(x[idx].to(device, dtype), **kwargs))[0]
                loss = torch.nn.functional.mse_loss(y.float(), target[idx].to(device, torch.float32))
                opt.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.clip)
            opt.step()
            if progress is not None and (step % 10 == 0 or step == config.steps - 1):
                progress.phase(f"refine step {step + 1}/{config.steps}, loss {float(loss.detach()):.3g}")
    finally:
        block.train(was_training)
        for p, f in zip(block.parameters(), flags):
            p.requires_grad_(f)
        del opt
    after = block_mse(block, x, target, kwargs, eval_bs, device)
    kept = after < before
    if not kept:  # never worse than the closed form on the block's own data
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return {"block": index, "mse_before": before, "mse_after": after if kept else before, "mse_trained": after,
            "steps": config.steps, "kept": kept, "params": sum(p.numel() for p in params),
            "seconds": round(time.perf_counter() - t0, 3)}
