"""Rank allocation: turn a stage's budget into a rank per targeted matrix.

Allocators are registered by name in ``ALLOCATORS``; each takes the stage and its plan rows (shapes) and fills in
``rank`` and ``factorize``. Data-dependent budgets (``energy``) leave ``rank=None``: the pipeline decides it from the
method's spectrum when the statistics exist.
"""
from __future__ import annotations

from .uniform import uniform

ALLOCATORS = {"uniform": uniform}


def allocate(stage, rows) -> None:
    ALLOCATORS[stage.allocator](stage, rows)
