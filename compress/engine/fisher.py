"""Empirical Fisher row/column sums of the targeted Linears, for FWSVD (methods.md §2b).

``I_ij = Σ_d (∂L_d/∂W_ij)²`` over calibration sequences d with the causal-LM loss (labels = inputs, shifted by
transformers), reduced at once to ``fisher_out[i] = Σ_j I_ij`` (per output row) and ``fisher_in[j] = Σ_i I_ij``
(per input feature). Each weight's gradient is reduced in a hook the moment it is accumulated and then dropped, so
memory is the model plus one backward's activations, never the model plus all gradients; only targeted weights
require grad. This is the one whole-model pass in lrc (FWSVD needs the loss at the output): the model is moved to
the device for it and moved back.
"""
from __future__ import annotations

import torch
from torch import nn


def fisher_sums(model: nn.Module, ids: torch.Tensor, names: list[str], device: torch.device,
                batch_size: int = 1, checkpointing: bool = False, progress=None) -> dict[str, torch.Tensor]:
    """``{f"{name}.fisher_out": (m,), f"{name}.fisher_in": (n,)}`` in float64 for every Linear in ``names``.

    ``batch_size`` sequences share one gradient (1 = the per-sequence empirical Fisher of the definition).
    """
    modules = dict(model.named_modules())
    weights = {modules[n].weight: n for n in names}
    acc = {f"{n}.{k}": torch.zeros(modules[n].weight.shape[i], dtype=torch.float64)
           for n in names for k, i in (("fisher_out", 0), ("fisher_in", 1))}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    had_ckpt = bool(getattr(model, flag, False))
    handles = []

    def reduce(param):
        g2 = param.grad.double().square()
        name = weights[param]
        acc[f"{name}.fisher_out"] += g2.sum(1).cpu()
        acc[f"{name}.fisher_in"] += g2.sum(0).cpu()
        param.grad = None  # dropped immediately: no full gradient outlives its own reduction

    home = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(p in weights)
        handles = [p.register_post_accumulate_grad_hook(reduce) for p in weights]
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
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        if checkpointing and not had_ckpt:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.train(was_training)
        model.to(home)
    return acc
