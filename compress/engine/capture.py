"""Capture what decoder block 0 receives: hidden states for every calibration sample and the keyword arguments the
blocks need (attention mask, position ids, rotary ``position_embeddings``), architecture-generically via a pre-hook.
"""
from __future__ import annotations

import torch
from torch import nn

DROP_KWARGS = {"past_key_value", "past_key_values", "use_cache", "output_attentions", "layer_past"}


class StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


def map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device) -> None:
    """Move every parameter and buffer that is not inside ``blocks`` (embeddings, rotary tables, norm, head)."""
    inside = {id(m) for m in blocks.modules()}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for k, p in mod._parameters.items():
            if p is not None and p.device != torch.device(device):
                p.data = p.data.to(device)
        for k, b in mod._buffers.items():
            if b is not None:
                mod._buffers[k] = b.to(device)


@torch.no_grad()
def capture_block_inputs(model, blocks: nn.ModuleList, ids: torch.Tensor, out: torch.Tensor, batch_size: int,
                         device) -> dict:
    """Write block 0's hidden-state inputs for ``ids`` into ``out`` and return the (batch-1) block kwargs on CPU."""
    seen: dict = {}

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["hidden"] = hidden
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k not in DROP_KWARGS and k != "hidden_states"}
        raise StopForward

    move_outside_blocks(model, blocks, device)
    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        def run(batch):
            try:
                model(batch.to(device), use_cache=False)
            except StopForward:
                pass

        run(ids[:1])  # kwargs for a batch of one: they broadcast over any batch size
        kwargs = map_tensors(seen["kwargs"], lambda t: t.detach().cpu())
        for s in range(0, ids.shape[0], batch_size):
            run(ids[s : s + batch_size])
            out[s : s + batch_size] = seen["hidden"].to("cpu", out.dtype)
    finally:
        handle.remove()
        move_outside_blocks(model, blocks, "cpu")
    return kwargs
