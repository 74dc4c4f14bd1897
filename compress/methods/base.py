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
# what a module is after a stage, in the words of ``lrc plan``'s refusals (``Method.acts_on``, ``Method.leaves``);
# a method whose modules are of a kind of their own adds it from its package (``methods/cospadi/``, ``methods/eora/``)
MODULE_KINDS = {"dense": "a dense Linear", "lowrank": "a low-rank factorisation",
                "reshaped": "a resized module (its input or output dims shrunk)"}


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
    # block's modules found by role, ``compress/roles.py``: the method plans its units, declares the
    # ``statistics`` of each unit and rebuilds the modules itself; the block-method hooks below)
    unit: ClassVar[str] = "linear"
    unit_kinds_all: ClassVar[tuple[str, ...]] = ("linear",)  # the plan-row kinds it can produce (allocators check)
    # the cost model of its plan rows (``allocation/cost.py``); one other than ``lowrank`` comes with ``cost_args``
    # and usually ``replacement = "build"`` (the Linear-method hooks below; example: ``methods/cospadi/``)
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

    # ------------------------------------------------------------------------------ Linear methods (unit == "linear")
    # How the engine (``engine/decompose.py``) turns one Linear into its replacement, by ``replacement``:
    #   "spectrum": ``spectrum(target, stats)``, truncated at the row's rank into a ``LowRankLinear`` (the default);
    #   "build":    ``build(target, bias, stats, row, dtype)``: the method builds a module of its own type (the report
    #               row's ``type`` is that module type's, ``checkpoint/module_types.py``);
    #   "wrap":     ``wrap(module, original, stats, row)``: a module around whatever an earlier stage left there, which
    #               stays its base (kind "compensation"; the allocators read ``wrap_sigma``).
    # Rows whose ``shared_group`` is not None are fitted together when the group's last block is reached
    # (``engine/shared.py`` keeps the waiting and the run-cache bookkeeping; the method ``fit_group``).
    replacement: ClassVar[str] = "spectrum"

    def cost_args(self, row, block: int, num_blocks: int, value_bits: int) -> dict:
        """What the row's cost model reads besides the shape (``row.cost_args``), for a ``cost_model`` other than
        ``lowrank``; ``make_plan`` calls it for every row of the stage (one instance) before it allocates."""
        return {}

    def build(self, target: torch.Tensor, bias: torch.Tensor | None, stats: dict[str, torch.Tensor], row,
              dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
        """``replacement == "build"``: the module replacing a Linear of weight ``target`` (float64, m × n; the
        dense-objective target when the recipe asks for it) at ``row``'s knob, in ``dtype``, and extra report fields
        (its ``note`` joins the row's)."""
        raise NotImplementedError

    def wrap(self, module: torch.nn.Module, original: torch.Tensor, stats: dict[str, torch.Tensor], row
             ) -> tuple[torch.nn.Module, dict]:
        """``replacement == "wrap"``: a module around ``module`` (what an earlier stage left; dense at the start)
        repairing its error against ``original`` (the block's weight before its stages), and its whole report row."""
        raise NotImplementedError

    def repair(self, module: torch.nn.Module, original: torch.Tensor, gram: torch.Tensor | None, rank: int
               ) -> tuple[torch.nn.Module, dict]:
        """Kind "compensation": ``module`` (e.g. a ``QuantLinear``) plus a rank-``rank`` path repairing its error
        against ``original`` on inputs of Gram ``gram`` (``quantize.compensate``), and report fields (``rank``,
        ``base_error`` and ``rel_error``: the weighted error before and after, ``residual_bytes``)."""
        raise NotImplementedError

    def wrap_sigma(self, delta: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """``replacement == "wrap"``: the singular values a global allocator reads for the error ``delta = original −
        module`` (descending; ``Σ_{i>r} σ_i²`` is the error left at rank r)."""
        raise NotImplementedError

    @classmethod
    def shared_group(cls, row) -> tuple | None:
        """The key (a tuple) of the group ``row`` is fitted with (rows of one stage with equal keys, across blocks:
        ``fit_group`` when the last of them is reached), or None (fitted as its block is compressed). Read from the
        plan row alone, so the engine may ask the class."""
        return None

    def fit_group(self, rows: list, weights: list[torch.Tensor], grams: list[torch.Tensor],
                  biases: list[torch.Tensor | None], dtypes: list[torch.dtype]) -> list[tuple[torch.nn.Module, dict]]:
        """One joint fit for a complete group (``rows`` in block order, each member's weight, input Gram, bias and
        the dtype of the module it replaces, on the fit's device): per member the new module and its report fields
        (the engine adds the error and the group's time, on its first member)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ block methods (unit == "block")
    # What the block-unit paths call; they name no method and no unit kind themselves. The plan
    # (``plan_units.unit_rows``) asks ``unit_rows`` per block. The engine (``engine/units.compress_units``), per block
    # and stage: ``roles`` and ``check_roles``, then ``phases`` in the block's call order; per phase one statistics
    # pass collecting what ``statistics`` declares for its units, then ``rebuild``. Example: ``methods/modegpt/``.

    def unit_rows(self, block: torch.nn.Module, config, scope) -> tuple[list, list[str]]:
        """The plan rows of one block's units that ``scope`` selects (``plan_units.UnitScope``: the block's name and
        index, the stage, ``scope.pick`` for its targets), and notes on what was left out. A row has ``members``
        (role → full module name), ``block``, a ``knob`` (kept size), a ``cost_model`` and a ``remark``."""
        raise NotImplementedError

    def roles(self, block: torch.nn.Module, config, rows: list, prefix: str):
        """The block's modules in the roles that ``rows`` need, as an object only the method reads (``prefix``: the
        block's name and a dot); ``LrcError`` when the block has no such modules."""
        raise NotImplementedError

    def check_roles(self, roles, groups: list[list[str]]) -> None:
        """``LrcError`` when ``roles`` contradict the block's data flow (``groups``: module names relative to the
        block, grouped by the input tensor they read, in call order)."""

    def phases(self, rows: list, roles) -> list[tuple[str, str, list]]:
        """``rows`` (one block's units of one stage) grouped by the parent module they live in, each group rebuilt
        in one step: ``[(phase name, the parent's first module relative to the block, rows)]``; the engine orders
        the phases by the call order of that module."""
        raise NotImplementedError

    def statistics(self, row) -> dict[str, list[tuple[str, str]]]:
        """What one unit needs: collector name (``engine.stats.COLLECTORS``) → [(role, full module name)]."""
        raise NotImplementedError

    def rebuild(self, block: torch.nn.Module, roles, rows: list, stats: dict) -> tuple[dict, list]:
        """Replace, in ``block``, the modules of one phase's units from ``stats`` (collector → full module name →
        tensor); returns (specs of the new modules by full name, one report row per unit, kept whole or not)."""
        raise NotImplementedError


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: ``@register`` adds the method to the registry under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(name)
    return METHODS[name]
