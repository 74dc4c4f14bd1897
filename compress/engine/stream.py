"""Whole-model passes run block by block: one decoder block on the device at a time (issue 13, goal 5).

The Fisher pass (FWSVD) and ASVD's sensitivity sweep need the causal-LM loss at the model's output, which used to
mean moving the whole model to the device (or, lazily loaded, materialising every block). Here they run the decoder
blocks themselves, each brought to the device by a ``Host`` and given back, and compute the loss with the model's own
head: ``head_loss`` runs the model's forward with its block list replaced by one ``_Replay`` module that returns the
given hidden states, so the final norm, the head, any logit soft-capping and the loss are exactly the model's code,
whatever the architecture. Device memory is then one block, the head and the activations of the pass.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

# attributes a model's layer loop may read from a layer (which mask it gets); the replay copies the last block's
_LAYER_ATTRS = ("attention_type", "layer_type", "layer_idx", "is_sliding", "sliding_window")


class Host:
    """Decoder blocks put on ``device`` one at a time: materialised from the shards (``LazyBlocks``) and given back
    to the meta device, or moved from the CPU and back."""

    def __init__(self, blocks: nn.ModuleList, device, lazy=None):
        self.blocks, self.device, self.lazy = blocks, torch.device(device), lazy

    def load(self, i: int) -> nn.Module:
        return self.lazy.load(i, self.device) if self.lazy is not None else self.blocks[i].to(self.device)

    def unload(self, i: int) -> None:
        if self.lazy is not None:
            self.lazy.unload(i)
        else:
            self.blocks[i].to("cpu")


def hidden(y) -> tuple[torch.Tensor, bool]:
    """A block's output hidden states, and whether the block returned a tuple (transformers before 4.54)."""
    return (y[0], True) if isinstance(y, (tuple, list)) else (y, False)


class _Replay(nn.Module):
    """Stands in for all decoder blocks: ignores its input and returns ``self.h`` as a block returns its output."""

    def __init__(self, last: nn.Module, as_tuple: bool):
        super().__init__()
        self.h, self.as_tuple = None, as_tuple
        for attr in _LAYER_ATTRS:
            if attr in last.__dict__:
                object.__setattr__(self, attr, last.__dict__[attr])

    def forward(self, *args, **kwargs):
        return (self.h,) if self.as_tuple else self.h


@contextmanager
def replayed(model: nn.Module, prefix: str, as_tuple: bool):
    """Within the block, ``model``'s decoder blocks (``prefix``, e.g. ``model.layers``) are one ``_Replay``."""
    owner, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    blocks = parent._modules[attr]
    replay = _Replay(blocks[len(blocks) - 1], as_tuple)
    parent._modules[attr] = nn.ModuleList([replay])
    try:
        yield replay
    finally:
        parent._modules[attr] = blocks


def head_loss(model: nn.Module, prefix: str, as_tuple: bool, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The model's causal-LM loss (labels = ``ids``, mean over the batch's predicted tokens) when its last block
    outputs ``h``: exactly what ``model(input_ids=ids, labels=ids).loss`` gives when the blocks compute ``h``."""
    with replayed(model, prefix, as_tuple) as replay:
        replay.h = h
        return model(input_ids=ids.to(h.device), labels=ids.to(h.device), use_cache=False).loss
