"""Knobs of unit rows (groups of a block's modules, ``Method.unit == "block"``) from a kept fraction: the plan's
``uniform`` decision (``param_ratio`` for every unit) and ``block_influence``'s (each block's own share). The knob
comes from the row's cost model, so this names no method and no unit kind."""
from __future__ import annotations

from .cost import cost_of


def allocate_units(stage, rows: list, kept_by_block: dict[int, float] | None = None) -> None:
    """Set every unit's knob from its kept fraction: ``param_ratio`` for all (uniform), or the block's own share
    (``kept_by_block``, from block_influence). Knobs go through the row's cost model."""
    for r in rows:
        f = stage.param_ratio if kept_by_block is None else kept_by_block[r.block]
        r.kept_fraction_target = round(float(f), 6)
        r.knob = cost_of(r).knob_for(r, f)
        r.note = f"kept share {f:.4f}" + ("" if kept_by_block is None else " (block influence)") + \
            (f"; {r.remark}" if r.remark else "")
