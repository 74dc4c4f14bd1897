"""Calibration streams: one per distinct calibration set in a recipe.

The recipe's ``calibration`` is the main stream (``acts``); a stage that names its own ``calibration`` (EoRA's
"customised compensation": task questions instead of general text) gets a stream of its own (``stage<i>``), shared by
later stages that name the same set. Every stream is captured at block 0 and propagated through each block once all
of that block's stages are done, so a stage's statistics always come from its own text flowing through the model as
compressed so far. Each stream has its own sequence length, hence its own per-block arguments (masks, rotary tables:
``capture.BlockKwargs``). The streams live in the run cache (``<name>_<i>.bin``, ``kwargs[_<name>].pt``) and resume
together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibration import calibration_tokens
from ..recipe import CalibrationConfig, Recipe
from .capture import BlockKwargs, capture_block_inputs

MAIN = "acts"


@dataclass
class Stream:
    name: str
    cfg: CalibrationConfig
    stages: list[int] = field(default_factory=list)
    ids: torch.Tensor | None = None
    kwargs: BlockKwargs | None = None  # every block's kwargs for this stream's sequence length, on CPU
    dev_kwargs: BlockKwargs | None = None  # the same on the device: ``dev_kwargs[i]`` is what block i is called with
    x_in: torch.Tensor | None = None  # this block's inputs (memory-mapped)

    def shape(self, hidden: int) -> tuple[int, int, int]:
        return (self.ids.shape[0], self.ids.shape[1], hidden)


def make_streams(recipe: Recipe) -> list[Stream]:
    """The main stream first, then one per distinct stage calibration set, each knowing the stages it feeds."""
    streams = [Stream(MAIN, recipe.calibration)]
    for i, stage in enumerate(recipe.stages):
        cfg = stage.calibration or recipe.calibration
        s = next((s for s in streams if s.cfg == cfg), None)
        if s is None:
            s = Stream(f"stage{i}", cfg)
            streams.append(s)
        s.stages.append(i)
    return streams


def load_tokens(streams: list[Stream], model, tokenizer, cache_dir: Path, batch_size: int) -> None:
    for s in streams:
        s.ids = calibration_tokens(model, tokenizer, s.cfg, cache_dir, batch_size)


def stream_of(streams: list[Stream], stage: int) -> Stream:
    return next(s for s in streams if stage in s.stages)


def capture(streams, model, blocks, cache, dtype, batch_size, device) -> None:
    """Block 0's inputs and every block's kwargs for every stream, written to the run cache."""
    hidden = model.config.hidden_size
    for s in streams:
        s.x_in = cache.acts(0, s.shape(hidden), dtype, create=True, stream=s.name)
        s.kwargs = capture_block_inputs(model, blocks, s.ids, s.x_in, batch_size, device)
        cache.save_kwargs(s.kwargs.state(), s.name)


def restore(streams, cache, block: int, hidden: int, dtype) -> bool:
    """Reopen every stream at ``block`` from the cache; False when something is missing (start over)."""
    try:
        for s in streams:
            s.kwargs = BlockKwargs.from_state(cache.load_kwargs(s.name))
            s.x_in = cache.acts(block, s.shape(hidden), dtype, stream=s.name)
            if s.kwargs is None:
                return False
    except FileNotFoundError:
        return False
    return True


def to_device(streams, device) -> None:
    for s in streams:
        s.dev_kwargs = s.kwargs.to(device) if s.kwargs is not None else None


def summary(streams) -> dict:
    """For the report: which stages read which calibration set, and how many tokens it has."""
    return {s.name: {"stages": s.stages, "tokens": int(s.ids.numel()),
                     "sources": [src.dataset for src in s.cfg.sources()]} for s in streams}
