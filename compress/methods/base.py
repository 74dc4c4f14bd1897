"""The method protocol and registry.

A method declares the calibration statistics it needs (collector names, see ``compress.engine.stats``) and turns one
Linear's weight plus those statistics into a ``Spectrum`` whose ``factors(rank)`` give the low-rank replacement. It does
not move tensors between devices, read data or know about blocks: the pipeline owns all of that.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from ..linalg import Spectrum

METHODS: dict[str, type["Method"]] = {}
# what a module is after a stage, in the words of ``lrc plan``'s refusals (``Method.acts_on``, ``Method.leaves``)
MODULE_KINDS = {"dense": "a dense Linear", "lowrank": "a low-rank factorisation",
                "dictionary": "a dictionary module", "shared-dictionary": "a dictionary shared across blocks (fitted "
                "only when the group's last block is reached)", "reshaped": "a resized module (its input or output "
                "dims shrunk)", "compensated": "a module with a residual path"}


class MethodConfig(BaseModel):
    """Typed options of a method (the ``options:`` mapping of a recipe stage). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Method:
    """Base class of a decomposition method. Subclasses set the class attributes and implement ``spectrum``."""

    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    needs: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "decomposition"  # or "compensation": adds a residual to whatever an earlier stage left
    # what one decision acts on: "linear" (one Linear → ``spectrum``, factors chosen by rank) or "block" (groups of a
    # block's modules found by role, ``compress/roles.py``: the method lists its ``unit_kinds``, declares the
    # ``statistics`` of each unit and rebuilds the modules itself; see ``methods/modegpt.py``)
    unit: ClassVar[str] = "linear"
    unit_kinds_all: ClassVar[tuple[str, ...]] = ("linear",)  # the plan-row kinds it can produce (allocators check)
    # the cost model of its plan rows (``allocation/cost.py``); one other than ``lowrank`` comes with
    # ``cost_args(row, block, num_blocks, value_bits)`` and ``build(target, bias, stats, row, dtype)``, which returns
    # the replacement module instead of a spectrum (CoSpaDi: ``methods/cospadi.py``)
    cost_model: ClassVar[str] = "lowrank"
    # module kinds (``MODULE_KINDS``) a stage of this method can act on: a module an earlier stage left as another
    # kind is refused by ``lrc plan`` in one line (``plan.check_order``), before any work
    acts_on: ClassVar[frozenset[str]] = frozenset({"dense"})

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_cls()

    def leaves(self) -> str:
        """The kind (``MODULE_KINDS``) of a module this method compressed, as a later stage finds it."""
        return "lowrank"

    def spectrum(self, weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> Spectrum:
        """The (weighted) SVD of ``weight`` (float64, m x n) whose truncation is this method's rank-r solution."""
        raise NotImplementedError


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: ``@register`` adds the method to the registry under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(name)
    return METHODS[name]
