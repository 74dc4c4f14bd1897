"""The allocator registry: one ``Allocator`` entry per name, added by ``register_allocator`` (one line at the end of
each allocator's module). Recipes validate ``allocator`` and ``allocator_options`` against it, ``lrc methods`` lists
it, and the engine reads ``reads`` to know what its dense pre-pass must collect."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# what an allocator reads per matrix before it can decide (``Allocator.reads``), in words for ``lrc methods``
NEEDS = {None: "shapes only", "method": "method spectra (statistics pass)", "weights": "weight spectra (data-free)",
         "sweep": "perplexity sweep (per matrix and ratio)",
         "anchors": "whitened spectra + a measured KL per matrix, then per trial"}


@dataclass(frozen=True)
class Allocator:
    """``fn(stage, rows, spectra, options)`` sets each row's knob (``rank``/``factorize``/``note``).

    ``reads``: None (shapes only: decided in the plan), ``"method"`` (the method's spectrum from the dense pre-pass),
    ``"weights"`` (the plain weight's spectrum) or ``"sweep"`` (ASVD's perplexity sweep); a new kind needs ``needs``,
    its words for ``lrc methods``. ``options``: the pydantic model of ``allocator_options`` (None: takes none).
    ``unit_kinds``: the rows it can allocate: ``linear`` (one Linear), ``residual`` (a compensation stage's residual
    paths), or the kinds of structured units; ``any_kind``: every kind a method plans (an allocator that decides each
    row by its own cost model alone, from shapes); ``block_units``: also the units of every block method (rows that
    are no Linear and no residual: it measures them through the method's own hooks)."""

    name: str
    fn: Callable
    reads: str | None
    description: str
    options: type | None = None
    unit_kinds: tuple[str, ...] = ("linear",)
    needs_text: str | None = None
    any_kind: bool = False
    block_units: bool = False

    @property
    def needs(self) -> str:
        return self.needs_text or NEEDS[self.reads]

    def allocates(self, kind: str) -> bool:
        """True when it can allocate plan rows of ``kind``."""
        return self.any_kind or kind in self.unit_kinds or (self.block_units and kind not in ("linear", "residual"))

    @property
    def is_global(self) -> bool:
        """True when it decides only after a pre-pass over the dense model (``reads`` is not None)."""
        return self.reads is not None

    def check_options(self, options: dict[str, Any]):
        """``options`` validated by the entry's model (``ValueError`` when it takes none but some are given)."""
        if self.options is not None:
            return self.options.model_validate(options)
        if options:
            raise ValueError(f"allocator {self.name} takes no allocator_options")
        return None


ALLOCATORS: dict[str, Allocator] = {}


def register_allocator(name: str, fn: Callable, reads: str | None, description: str, options: type | None = None,
                       unit_kinds: tuple[str, ...] = ("linear",), needs: str | None = None,
                       any_kind: bool = False, block_units: bool = False) -> Allocator:
    """Add an allocator to ``ALLOCATORS`` (a later registration under the same name replaces it)."""
    if needs is None and reads not in NEEDS:
        raise ValueError(f"allocator {name}: reads {reads!r} is none of {list(NEEDS)}; say what it reads in needs=")
    entry = Allocator(name, fn, reads, description, options, tuple(unit_kinds), needs, any_kind, block_units)
    ALLOCATORS[name] = entry
    return entry


class FieldView(Mapping):
    """A read-only, live mapping ``name -> entry.<field>`` over the registered allocators (only entries whose value
    passes ``keep``): the module-level names older code imports (``SPECTRUM``, ``OPTIONS``, ``DESCRIPTIONS``)."""

    def __init__(self, field: str, keep: Callable[[Any], bool] = lambda v: True):
        self._field, self._keep = field, keep

    def __getitem__(self, name: str):
        entry = ALLOCATORS.get(name)
        value = getattr(entry, self._field, None)
        if entry is None or not self._keep(value):
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return (n for n, e in ALLOCATORS.items() if self._keep(getattr(e, self._field)))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"
