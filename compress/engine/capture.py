"""Capture what the decoder blocks receive: block 0's hidden states for every calibration sample, and the keyword
arguments of every block (attention mask, position ids, rotary ``position_embeddings``), architecture-generically.

The arguments are per block because transformers gives each layer those of its own attention type: a sliding-window
layer (Gemma2/3, Qwen2 with ``use_sliding_window``, GPT-OSS, Cohere2) gets a banded mask, Gemma3's local layers
another rotary table. They are kept once per distinct set (``BlockKwargs``): two or three sets, whatever the depth.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DROP_KWARGS = {"past_key_value", "past_key_values", "cache", "use_cache", "output_attentions", "layer_past"}


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


def map_shared(obj, fn):
    """``map_tensors`` that applies ``fn`` once per distinct tensor: a tensor several blocks share (the rotary
    table) stays one tensor after the move."""
    memo: dict[int, torch.Tensor] = {}

    def once(t):
        if id(t) not in memo:
            memo[id(t)] = fn(t)
        return memo[id(t)]
    return map_tensors(obj, once)


def _same(a, b) -> bool:
    """Equal values, tensors compared exactly (dtype, shape and elements)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@dataclass
class BlockKwargs:
    """The keyword arguments of every decoder block: ``self[i]`` is block i's, stored once per distinct set."""

    sets: list[dict]
    index: list[int]  # block i -> sets[index[i]]

    @classmethod
    def collect(cls, per_block: list[dict]) -> BlockKwargs:
        sets: list[dict] = []
        index = []
        for kw in per_block:
            j = next((j for j, s in enumerate(sets) if _same(s, kw)), None)
            if j is None:
                sets.append(kw)
                j = len(sets) - 1
            index.append(j)
        return cls(sets, index)

    def __getitem__(self, i: int) -> dict:
        return self.sets[self.index[i]]

    def __len__(self) -> int:
        return len(self.index)

    def to(self, device) -> BlockKwargs:
        """A copy on ``device``; a tensor the sets share (one rotary table for all) is moved once."""
        return BlockKwargs(map_shared(self.sets, lambda t: t.to(device)), list(self.index))

    def state(self) -> dict:
        """What the run cache saves (``torch.save``-able, loads with ``weights_only``)."""
        return {"sets": self.sets, "index": self.index}

    @classmethod
    def from_state(cls, state) -> BlockKwargs | None:
        """None for anything else (a cache written before per-block arguments: the run starts over)."""
        if not isinstance(state, dict) or set(state) != {"sets", "index"}:
            return None
        return cls(list(state["sets"]), [int(i) for i in state["index"]])


def _block_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in DROP_KWARGS and k != "hidden_states"}


@torch.no_grad()
def capture_kwargs(model, blocks: nn.ModuleList, ids: torch.Tensor, device) -> BlockKwargs:
    """Every block's keyword arguments for a batch of one (they broadcast over any batch size), on CPU.

    One forward of the model in which each block's ``forward`` is replaced by a probe that records its arguments and
    hands its input on unchanged: the blocks' weights are never needed (they may stay on the CPU) and the arguments
    are exactly what the model's own loop gives each layer. The last probe ends the forward.
    """
    per_block: list[dict | None] = [None] * len(blocks)

    def probe(i):
        def forward(*args, **kwargs):
            per_block[i] = _block_kwargs(kwargs)
            if i == len(blocks) - 1:
                raise StopForward
            return args[0] if args else kwargs["hidden_states"]
        return forward

    saved = [b.__dict__.get("forward") for b in blocks]
    for i, b in enumerate(blocks):
        b.forward = probe(i)
    try:
        model(ids.to(device), use_cache=False)
    except StopForward:
        pass
    finally:
        for b, f in zip(blocks, saved):
            del b.forward
            if f is not None:
                b.forward = f
    missing = [i for i, kw in enumerate(per_block) if kw is None]
    if missing:
        raise RuntimeError(f"{type(model).__name__}: decoder blocks {missing} were not called in a forward pass")
    return BlockKwargs.collect(map_shared(per_block, lambda t: t.detach().cpu()))


@torch.no_grad()
def capture_block_inputs(model, blocks: nn.ModuleList, ids: torch.Tensor, out: torch.Tensor, batch_size: int,
                         device) -> BlockKwargs:
    """Write block 0's hidden-state inputs for ``ids`` into ``out`` and return every block's (batch-1) kwargs."""
    seen: dict = {}

    def grab(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise StopForward

    move_outside_blocks(model, blocks, device)
    try:
        kwargs = capture_kwargs(model, blocks, ids[:1], device)
        handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for s in range(0, ids.shape[0], batch_size):
                try:
                    model(ids[s : s + batch_size].to(device), use_cache=False)
                except StopForward:
                    pass
                out[s : s + batch_size] = seen["hidden"].to("cpu", out.dtype)
        finally:
            handle.remove()
    finally:
        move_outside_blocks(model, blocks, "cpu")
    return kwargs
