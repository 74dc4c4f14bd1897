"""Rank allocation: turn a stage's budget into a rank per targeted matrix (the step between statistics and
decomposition).

``uniform`` needs only the shapes (``lrc plan`` shows it from the config). The global allocators see every targeted
matrix's spectrum first and meet the stage's ``param_ratio`` over all of them: ``energy`` and ``loss`` use the
method's own (e.g. whitened) spectrum from a statistics pass over the dense model, ``welore`` the plain weight's.
Each is ``fn(stage, rows, spectra, options)``, registered in ``ALLOCATORS`` (``registry.py``), and sets
``rank``/``factorize``/``note`` on the rows; parameters at a rank come from each row's cost model (``cost.py``).
Every knob is decided here: in the plan (``allocate``), after the dense pre-pass (``allocate_global``), or from a
matrix's own spectrum during compression (``decide_from_spectrum``, an ``energy`` budget).
"""
from __future__ import annotations

# registration, in the order lrc methods lists
from . import uniform, energy, welore, loss, sensitivity, influence, search  # noqa: F401
from .cost import COST_MODELS, CostModel, cost_of, register_cost_model
from .registry import ALLOCATORS, NEEDS, Allocator, FieldView, register_allocator
from .uniform import decide_from_spectrum

# the registry's fields by name, as older code reads them (live views: later registrations show up)
OPTIONS = FieldView("options", lambda v: v is not None)
SPECTRUM = FieldView("reads", lambda v: v is not None)  # what a global allocator reads per matrix
DESCRIPTIONS = FieldView("description")

__all__ = ["ALLOCATORS", "COST_MODELS", "DESCRIPTIONS", "NEEDS", "OPTIONS", "SPECTRUM", "Allocator", "CostModel",
           "allocate", "allocate_global", "cost_of", "decide_from_spectrum", "needs", "register_allocator",
           "register_cost_model"]


def needs(name: str) -> str:
    """What allocator ``name`` reads before it can decide a rank (``lrc methods``)."""
    return ALLOCATORS[name].needs


def allocate(stage, rows) -> None:
    """Shape-only step of ``make_plan``: allocators that read only shapes decide now; global allocators wait for
    ``allocate_global``."""
    entry = ALLOCATORS[stage.allocator]
    if not entry.is_global:
        entry.fn(stage, rows, None, stage.allocator_options)
    else:
        for r in rows:
            r.rank, r.factorize, r.note = None, None, f"{stage.allocator} allocator (needs spectra)"


def allocate_global(stage, rows, spectra) -> None:
    ALLOCATORS[stage.allocator].fn(stage, rows, spectra, stage.allocator_options)
