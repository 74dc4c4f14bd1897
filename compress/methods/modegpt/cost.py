"""MoDeGPT's cost model ``structured`` (Lin et al., ICLR 2025, arXiv 2408.09632, Sec. 3.4: every unit of layer l
keeps ``k = ⌈(1 − φ_l)·d⌉`` of its d dims).

A unit's knob is its number of kept dims (intermediate neurons, or head dims of q/k or of v/o), and its parameters
are linear in it: ``per_dim · kept + fixed``, so a kept fraction f of the dims keeps a fraction f of the unit's
parameters up to rounding. Allocators only ever ask this model (``params``, ``knob_for``), never r(m+n).
"""
from __future__ import annotations

from ...allocation.cost import CostModel, register_cost_model
from .math import kept_dims


class StructuredCost(CostModel):
    """``per_dim · kept + fixed`` parameters; all dims kept = the unit as it is. The knob is a number of kept dims, a
    multiple of ``row.multiple`` (RoPE pairs for q/k) in [multiple, dim]."""

    name = "structured"

    def params(self, row, knob: int) -> int:
        return row.params_dense if knob >= row.dim else row.per_dim * knob + row.fixed

    def knob_for(self, row, kept_fraction: float) -> int:
        return kept_dims(row.dim, kept_fraction, row.multiple)

    def align(self, row, knob: int, up: bool = False) -> int:
        m = row.multiple
        knob = -(-knob // m) * m if up else knob // m * m
        return min(max(knob, m), row.dim)

    def max_saving(self, row) -> int:
        return row.dim - row.multiple

    def describe(self, row) -> str:
        return row.describe()


STRUCTURED = register_cost_model(StructuredCost())
