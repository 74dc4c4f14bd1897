"""One block's work in the block loop: what ``pipeline.compress_blocks`` knows about the block being compressed,
handed as one object to the paths that compress it (``pipeline.compress_block``, ``lockstep``, ``units``) and to
``decompose.replace_group``, which adds each replacement's spec and report row to it."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class BlockJob:
    block: nn.Module  # on the device; modules are replaced in place
    index: int
    prefix: str  # the block's full name with a trailing dot ("model.layers.3.")
    rows: list  # this block's plan rows, every stage
    recipe: Any
    streams: list  # calibration streams (``streams.Stream``), the main one first
    outs: dict  # stream name -> the next block's input tensor (memory-mapped)
    device: torch.device
    progress: Any
    config: Any = None  # the model's config (roles of block methods)
    dense_io: tuple | None = None  # (dense inputs, dense outputs): ``objective: dense`` or ``refine``
    extra: Mapping = field(default_factory=dict)  # gradient statistics by module name (``spectra.BlockStats``)
    reference: nn.Module | None = None  # the dense block a compensation repairs towards (default: ``block``)
    shared: Any = None  # ``shared.SharedGroups`` of the run, or None
    originals: dict = field(default_factory=dict)  # module -> its weight before this block's stages (compensation)
    written: set = field(default_factory=set)  # streams whose outputs are already written
    specs: dict = field(default_factory=dict)  # results: module name -> spec (``lrc.modules``)
    report: list = field(default_factory=list)  # results: report rows
    refined: dict | None = None  # results: the block's refinement (``refine.refine_block``), when the recipe asks
    quantized: list | None = None  # results: the block's quantized matrices (``quantize.quantize_block``)

    @property
    def eng(self):
        return self.recipe.engine

    @property
    def main(self):
        return self.streams[0]

    def wanted(self) -> set[str]:
        """Module names (relative to the block) the rows act on."""
        return {n.removeprefix(self.prefix) for r in self.rows for n in r.modules()}


@dataclass
class Run:
    """The whole run, as the block loop and the pre-passes (``spectra.py``) see it."""

    model: nn.Module  # whole, or a meta-device skeleton with ``lazy``
    prefix: str  # the block list's name ("model.layers")
    blocks: nn.ModuleList
    plan: list
    recipe: Any
    cache: Any  # ``cache.RunCache``
    streams: list
    device: torch.device
    progress: Any
    lazy: Any = None  # ``lazy.LazyBlocks``
    ref_blocks: nn.ModuleList | None = None  # a reference model's blocks (compensation of a model compressed elsewhere)
    extra: Mapping = field(default_factory=dict)  # gradient statistics by module name
    specs: dict = field(default_factory=dict)  # results so far: module name -> spec
    report: list = field(default_factory=list)  # results so far: report rows
    d_in: torch.Tensor | None = None  # the dense stream's inputs of the next block (``objective: dense``, refine)
    refined: list = field(default_factory=list)  # results so far: each block's refinement
    quantized: list = field(default_factory=list)  # results so far: every quantized matrix (``quantize.py``)
    allocation: dict = field(default_factory=dict)  # the global allocators' records by stage (``search``)

    def __post_init__(self):
        self.dtype = next(self.model.parameters()).dtype

    @property
    def main(self):
        return self.streams[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.main.shape(self.model.config.hidden_size)

    @property
    def dense_stream(self) -> bool:
        return self.recipe.engine.objective == "dense" or self.recipe.refine is not None
