"""The ``dictionary`` cost model (CoSpaDi, methods.md §6): a Linear stored as a dictionary and sparse coefficients.

The knob is the number of atoms ``k``; ``s = ⌊k/ρ⌋`` non-zeros per output neuron follow from the row's ``cost_args``
(``rho``, ``value_bits`` = the checkpoint dtype's width, ``mask_bits`` per coefficient slot, ``layers`` sharing one
dictionary, ``owner``: whether this row stores the shared dictionary). Parameters are the values a module holds
(``n·k`` if it owns its dictionary, ``s·m``, bias); storage adds the ``k·m``-bit support mask as written. A budget
``param_ratio`` is read as a kept fraction of STORAGE (the paper's Eq. 10), so that CoSpaDi and low-rank methods are
compared at equal bytes on disk. Registered when ``compress.methods`` is imported (``cospadi/__init__.py``).
"""
from __future__ import annotations

import math

from ...allocation.cost import CostModel, register_cost_model
from .math import dict_size, dict_storage_bits, nnz_for


def _args(row) -> tuple[float, int, float, int, bool]:
    a = row.cost_args
    return a.get("rho", 2.0), a.get("value_bits", 16), a.get("mask_bits", 1.0), a.get("layers", 1), \
        a.get("owner", True)


class DictionaryCost(CostModel):
    name = "dictionary"

    def nnz(self, row, k: int) -> int:
        return nnz_for(k, _args(row)[0])

    def params(self, row, knob: int) -> int:
        m, n = row.out_features, row.in_features
        bias = m if row.bias else 0
        if not self.saves(row, knob):
            return m * n + bias
        owner = _args(row)[4]
        return (n * knob if owner else 0) + self.nnz(row, knob) * m + bias

    def storage_bytes(self, row, knob: int, bytes_per_param: float) -> int:
        mask = math.ceil(knob / 8) * row.out_features if self.saves(row, knob) and _args(row)[2] > 0 else 0
        return int(self.params(row, knob) * bytes_per_param) + mask

    def saves(self, row, knob: int) -> bool:
        """Whether the group's storage at ``knob`` (one dictionary, every layer's values and masks) is below dense."""
        rho, vb, mb, layers, _ = _args(row)
        m, n = row.out_features, row.in_features
        s = nnz_for(knob, rho)
        if knob < 1 or s < 1 or s > min(knob, n):
            return False
        return dict_storage_bits(m, n, knob, s, vb, mb, layers) < layers * vb * m * n

    def knob_for(self, row, kept_fraction: float) -> int:
        rho, vb, mb, layers, _ = _args(row)
        k = dict_size(row.out_features, row.in_features, kept_fraction, rho, vb, mb, layers)[0]
        return self.align(row, k)

    def align(self, row, knob: int, up: bool = False) -> int:
        a = max(row.align, 1)
        knob = -(-knob // a) * a if up else knob // a * a
        return max(knob, 0)

    def max_saving(self, row) -> int:
        k = self.knob_for(row, 1.0)
        while k > 0 and not self.saves(row, k):
            k -= max(row.align, 1)
        return max(k, 0)

    def dense_note(self, row, knob: int) -> str:
        return f"kept dense: {knob} atoms save no storage"

    def describe(self, row) -> str:
        if row.rank is None:
            return "atoms ?"
        if row.factorize is False:
            return f"atoms {row.rank} (kept dense)"
        rho, _, _, layers, owner = _args(row)
        shared = "" if layers == 1 else (" (owns the shared dictionary)" if owner else " (shared dictionary)")
        return f"atoms {row.rank}, {self.nnz(row, row.rank)} per output" + shared


DICTIONARY = register_cost_model(DictionaryCost())
