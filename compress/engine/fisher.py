"""Empirical Fisher row/column sums of the targeted Linears, for FWSVD (methods.md §2b).

``I_ij = Σ_d (∂L_d/∂W_ij)²`` over calibration sequences d with the causal-LM loss (labels = inputs, shifted by
transformers), reduced at once to ``fisher_out[i] = Σ_j I_ij`` (per output row) and ``fisher_in[j] = Σ_i I_ij``
(per input feature). Each weight's gradient is reduced in a hook the moment it is accumulated and then dropped, so
memory is the model plus one backward's activations, never the model plus all gradients; only targeted weights
require grad.

``fisher_sums`` is the definition run on the whole model (a reference for the tests, and for models handed in
whole); the engine runs ``fisher_sums_streamed``: the same sums with one decoder block on the device at a time.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def _reducing(params, weights: dict, acc: dict):
    """Within the block only ``weights`` (parameter -> module name) of ``params`` require grad, and each one's
    gradient is squared and reduced into ``acc``'s row and column sums the moment it accumulates, then dropped (no
    full gradient outlives its own reduction). Flags are restored and gradients cleared on exit."""
    flags = {p: p.requires_grad for p in params}

    def reduce(param):
        g2, name = param.grad.double().square(), weights[param]
        acc[f"{name}.fisher_out"] += g2.sum(1).cpu()
        acc[f"{name}.fisher_in"] += g2.sum(0).cpu()
        param.grad = None

    handles = []
    try:
        for p in flags:
            p.requires_grad_(p in weights)
        handles = [p.register_post_accumulate_grad_hook(reduce) for p in weights]
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


def fisher_sums(model: nn.Module, ids: torch.Tensor, names: list[str], device: torch.device,
                batch_size: int = 1, checkpointing: bool = False, progress=None) -> dict[str, torch.Tensor]:
    """``{f"{name}.fisher_out": (m,), f"{name}.fisher_in": (n,)}`` in float64 for every Linear in ``names``.

    ``batch_size`` sequences share one gradient (1 = the per-sequence empirical Fisher of the definition).
    """
    modules = dict(model.named_modules())
    weights = {modules[n].weight: n for n in names}
    acc = {f"{n}.{k}": torch.zeros(modules[n].weight.shape[i], dtype=torch.float64)
           for n in names for k, i in (("fisher_out", 0), ("fisher_in", 1))}
    was_training = model.training
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    had_ckpt = bool(getattr(model, flag, False))
    home = next(model.parameters()).device
    try:
        with _reducing(list(model.parameters()), weights, acc):
            model.to(device)
            model.eval()  # no dropout: the Fisher of the deployed model
            if checkpointing:
                (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
                model.train()  # transformers only checkpoints in training mode; these models have no dropout at p>0
            for s in range(0, ids.shape[0], batch_size):
                x = ids[s : s + batch_size].to(device)
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                loss.backward()
                if progress is not None:
                    progress.phase(f"fisher {min(s + batch_size, ids.shape[0])}/{ids.shape[0]}")
    finally:
        if checkpointing and not had_ckpt:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.train(was_training)
        model.to(home)
    return acc


def fisher_sums_streamed(model: nn.Module, prefix: str, blocks: nn.ModuleList, ids: torch.Tensor, names: list[str],
                         host, cache, batch_size: int = 8, progress=None) -> dict[str, torch.Tensor]:
    """``fisher_sums`` (per-sequence gradients) with one block on ``host.device`` at a time (``stream.Host``).

    Block-major, as the compression loop runs: a forward pass stores every block's inputs for all sequences
    (the run cache's memory-mapped ``fisher_<j>.bin``, removed as the backward pass leaves them), the head gives each sequence's
    gradient at the last block's output, then blocks are visited from the last to the first, each loaded once:
    every sequence's block forward is recomputed from its stored input with autograd and back-propagated with that
    sequence's output gradient; the targeted weights' gradients (one sequence's, exactly) are reduced into the sums as
    they accumulate, and the input gradient goes on to the block below. Memory: one block, the head, one sequence's
    activations with autograd, and two ``sequences x tokens x hidden`` tensors; the stored inputs stay on disk.
    """
    from .capture import capture_block_inputs, move_outside_blocks
    from .stream import head_loss, hidden

    device, n_seq, L = host.device, ids.shape[0], len(blocks)
    dtype = model.get_input_embeddings().weight.dtype
    shape = (n_seq, ids.shape[1], model.config.hidden_size)
    acc: dict[str, torch.Tensor] = {}

    def store(j: int, create: bool = False) -> torch.Tensor:
        return cache.acts(j, shape, dtype, create=create, stream="fisher")

    x = store(0, create=True)
    kwargs = capture_block_inputs(model, blocks, ids, x, batch_size, device).to(device)
    as_tuple = False
    with torch.no_grad():  # forward: every block's inputs
        for j in range(L):
            block, y = host.load(j), store(j + 1, create=True)
            for s in range(0, n_seq, batch_size):
                out, as_tuple = hidden(block(x[s:s + batch_size].to(device), **kwargs[j]))
                y[s:s + batch_size] = out.to("cpu", dtype)
            host.unload(j)
            x = y
            if progress is not None:
                progress.phase(f"fisher forward {j + 1}/{L}")
    grad = cache.acts(0, shape, dtype, create=True, stream="fisher_grad")  # d loss_d / d (block output), per sequence d
    move_outside_blocks(model, blocks, device)
    try:
        for d in range(n_seq):
            h = x[d:d + 1].to(device, copy=True).requires_grad_(True)
            head_loss(model, prefix, as_tuple, h, ids[d:d + 1]).backward()
            grad[d:d + 1] = h.grad.to("cpu", dtype)
    finally:
        move_outside_blocks(model, blocks, "cpu")
    for j in reversed(range(L)):  # backward, block by block: per-sequence weight gradients, exactly
        block, mine = host.load(j), f"{prefix}.{j}."
        modules = dict(block.named_modules())
        targeted = {n.removeprefix(mine): n for n in names if n.startswith(mine)}
        weights = {modules[rel].weight: full for rel, full in targeted.items()}
        for rel, full in targeted.items():
            w = modules[rel].weight
            acc.setdefault(f"{full}.fisher_out", torch.zeros(w.shape[0], dtype=torch.float64))
            acc.setdefault(f"{full}.fisher_in", torch.zeros(w.shape[1], dtype=torch.float64))
        x_j = store(j)
        with _reducing(list(block.parameters()), weights, acc), torch.enable_grad():
            for d in range(n_seq):
                inp = x_j[d:d + 1].to(device, copy=True).requires_grad_(j > 0)
                out, _ = hidden(block(inp, **kwargs[j]))
                out.backward(grad[d:d + 1].to(device, out.dtype))
                if j > 0:
                    grad[d:d + 1] = inp.grad.to("cpu", dtype)
        host.unload(j)
        cache.acts_path(j + 1, "fisher").unlink(missing_ok=True)
        if progress is not None:
            progress.phase(f"fisher backward {L - j}/{L}")
    del x, grad, x_j
    for path in (cache.acts_path(0, "fisher"), cache.acts_path(0, "fisher_grad")):
        path.unlink(missing_ok=True)
    return acc
