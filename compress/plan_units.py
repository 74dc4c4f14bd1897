"""The plan's path for block methods (``Method.unit == "block"``): their units are groups of a block's modules that
the method finds by role and plans itself (``Method.unit_rows``). This module walks the blocks, applies the stage's
targets (``UnitScope``), keeps one stage per module and checks what such a stage accepts; it names no method and no
unit kind. The units' knobs are decided by ``allocation/units.py`` (uniform) or a global allocator.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import LrcError
from .methods import METHODS
from .roles import find_blocks


@dataclass(frozen=True)
class UnitScope:
    """Where a block method plans: block ``index`` of the blocks at ``prefix``, for stage ``stage`` (method name
    ``method``), whose ``targets``/``ignore`` regexes select member modules (``pick``)."""

    prefix: str
    index: int
    stage: int
    method: str
    targets: list[re.Pattern] | None
    ignore: list[re.Pattern]

    @property
    def where(self) -> str:
        """The block's full module name."""
        return f"{self.prefix}.{self.index}"

    def full(self, rel: str) -> str:
        """The full name of a module named ``rel`` relative to the block."""
        return f"{self.where}.{rel}"

    def pick(self, members: dict[str, str], notes: list[str]) -> bool:
        """Whether the stage targets every member (role → name relative to the block) of a unit; a unit is all or
        nothing: one only partly targeted is left out with a note in ``notes``."""
        names = [self.full(m) for m in members.values()]
        hit = [(self.targets is None or any(t.search(n) for t in self.targets))
               and not any(t.search(n) for t in self.ignore) for n in names]
        if any(hit) and not all(hit):
            notes.append(f"{self.where}: unit {sorted(members)} only partly targeted; left out")
        return all(hit)


def unit_rows(model: nn.Module, recipe, si: int, owner: dict[str, int]) -> tuple[list, list[str]]:
    """Every unit stage ``si`` targets, over all blocks; ``owner`` maps module names to the stage that claimed
    them (shared with the Linear stages: a module belongs to one stage only)."""
    stage = recipe.stages[si]
    method = METHODS[stage.method](recipe.method_config(si))
    try:
        targets = [re.compile(t) for t in stage.targets] if stage.targets else None
        ignore = [re.compile(t) for t in stage.ignore]
    except re.error as err:
        raise LrcError(f"stages[{si}].targets/ignore: bad regex ({err})") from None
    prefix, blocks = find_blocks(model)
    rows, notes = [], []
    for bi, block in enumerate(blocks):
        r, n = method.unit_rows(block, model.config, UnitScope(prefix, bi, si, stage.method, targets, ignore))
        for row in r:
            row.remark = "; ".join(x.removeprefix(f"{prefix}.{bi}: ") for x in n)
        rows += r
        notes += n
    for row in rows:
        for name in row.members.values():
            if name in owner and not recipe.same_group(owner[name], si):  # Linear stages were planned first
                first, then = sorted((si, owner[name]))
                raise LrcError(f"stages[{then}]: {name} is already compressed by stages[{first}]")
            owner.setdefault(name, si)
        row.alternative = stage.group is not None
    if not rows:
        raise LrcError(f"stages[{si}]: {stage.method} found no unit to compress"
                       + (f" ({notes[0]})" if notes else ""))
    return rows, notes


def check_stage(stage, si: int, recipe) -> None:
    """What a block-unit stage accepts beyond the recipe's checks (which refuse allocators that cannot allocate its
    units): a ``param_ratio`` budget and the layer objective (its closed forms fit each unit on its own inputs)."""
    if stage.param_ratio is None and stage.byte_ratio is None:
        raise LrcError(f"stages[{si}]: {stage.method} takes a param_ratio budget (the kept fraction of its units' "
                       "parameters; byte_ratio with search); rank and energy budgets are for low-rank methods")
    if recipe.engine.objective != "layer":
        raise LrcError(f"engine.objective: {stage.method} supports the layer objective only")
