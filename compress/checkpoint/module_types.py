"""The registry of lrc's module types: one ``ModuleType`` entry per type of module lrc writes into a checkpoint
(``lrc.modules[name]["type"]`` in config.json), with everything lrc does differently per type. Everything that lists
module types or branches on them reads this registry: the loader (``lrc_types.py``: the builders), the checkpoint's
remote code (``save.py``), the plan and ``lrc bench`` (units and their counts), the report and the progress lines
(report row types), ``lrc finetune`` (residual paths, low-rank factors), lazy loading and ``lrc info``.

The core types are registered here: ``lowrank`` (``LowRankLinear``) and ``dense`` (a plain, possibly resized
``nn.Linear``). A method whose modules are of a type of its own keeps the class and its builder in a remote-code file
of its package (e.g. ``methods/eora/lrc_compensated.py``; imports only torch, transformers and, relatively to the
package, the core remote files ``lrc_fast.py`` and ``lrc_layers.py``) and registers the entry with one line of its
``__init__.py``: ``register_module_type(ENTRY)``.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .lrc_layers import LowRankLinear, build_dense, build_lowrank

CORE_DIR = Path(__file__).parent  # the core remote files (modeling_lrc.py, lrc_layers.py, lrc_fast.py) live here


@dataclass(frozen=True)
class ReportType:
    """The report rows (``type == word``) of the modules of one type, as ``report.py`` and ``progress.py`` read them.

    ``count``: the key in ``report["targeted"]`` counting them; ``phrase``: them in the summary table's words;
    ``always``: ``count`` is written even when no row has the type; ``measured``: their ``rel_error`` measures a
    change (the running mean of the progress lines); ``repair``: it measures what is left after repairing an earlier
    stage's module (EoRA), so the summary's error of the compression leaves it out; ``units``: the rows are units
    (groups of a block's modules), not Linears: the report gives the kept fraction per block; ``columns``: fields of
    its own that ``lrc_modules.csv`` gets as columns when some row has them, ``(field, the column it follows)``."""

    word: str
    count: str
    phrase: str
    always: bool = False
    measured: bool = False
    repair: bool = False
    units: bool = False
    columns: tuple[tuple[str, str], ...] = ()


def effective_weight(m: nn.Module) -> torch.Tensor:
    """The dense matrix a Linear-like module applies (a copy, float64): its ``weight_approx`` when it has one."""
    return (m.weight_approx if hasattr(m, "weight_approx") else m.weight).detach().double().clone()


def linear_weights(m: nn.Module) -> int:
    """Weights of every ``nn.Linear`` in ``m`` (itself included) and of every quantized one (``stored_weights``)."""
    return sum(x.weight.numel() for x in m.modules() if isinstance(x, nn.Linear)) + stored_weights(m)


def describe_linear(spec: dict) -> tuple[str, str]:
    """``lrc info``'s shape and knob columns for a Linear-like spec: ``out x in`` and the rank (or ``-``)."""
    return f"{spec['out_features']} x {spec['in_features']}", str(spec.get("rank", "-"))


@dataclass(frozen=True)
class ModuleType:
    """One module type.

    - ``name``: the spec's ``type``; ``cls``: the module class (its subclasses are of the type too).
    - ``build``: the builder ``build(spec, dtype=None, base=None, build=None)`` (``modeling_lrc.build_module``), defined
      in the remote-code file ``remote`` beside ``cls``; None for a type no checkpoint can hold.
    - ``spec(module)``: the module's config entry; ``weights(module)``: the weights it multiplies per token, biases
      excluded (``lrc bench``'s FLOP-ideal count; by default those of its inner Linears). Parameters are counted as
      the module has them (``unit_params``); bytes on disk, where they differ, by the module's own
      ``storage_bytes()``.
    - ``unit``: a Linear-like replacement that lrc counts and compresses as a whole (``plan.linear_units``: its inner
      Linears are no units of their own); False for a module whose Linears are units of their own (an attention
      module) and for the plain Linear (a unit by itself).
    - ``report``: the ``ReportType`` of the report rows that describe modules of this type (for a block method's type,
      those of its units).
    - ``residual``: the submodules holding a residual path (``lrc finetune`` ``train: residual``, PEFT export);
      ``factors``: the (output, input) factor submodules of a low-rank product (``finetune.factors: sequential``).
    - ``lazy``: a checkpoint holding the type can be loaded block by block (``engine/lazy.py``); False for a module
      that checks its tensors as it is built.
    - ``describe(spec)``: the shape and the knob of a spec in ``lrc info``'s words.
    """

    name: str
    cls: type
    build: Callable | None
    spec: Callable[[nn.Module], dict]
    report: ReportType | None = None
    weights: Callable[[nn.Module], int] = linear_weights
    unit: bool = True
    residual: tuple[str, ...] = ()
    factors: tuple[str, str] | None = None
    lazy: bool = True
    describe: Callable[[dict], tuple[str, str]] = describe_linear

    @property
    def remote(self) -> Path | None:
        """The remote-code file that defines ``cls`` and ``build``."""
        return None if self.build is None else Path(sys.modules[self.build.__module__].__file__)

    @property
    def core(self) -> bool:
        """A type of lrc's core remote files (in every checkpoint)."""
        return self.remote is not None and self.remote.parent == CORE_DIR


TYPES: dict[str, ModuleType] = {}  # by spec type, in registration order
BUILDERS: dict[str, Callable] = {}  # spec type -> builder: ``lrc_types.MODULE_TYPES`` inside lrc
_BY_CLASS: dict[type, ModuleType] = {}


def register_module_type(entry: ModuleType) -> ModuleType:
    """Add ``entry`` (a later registration under the same name replaces it). Its remote file must not shadow a core
    file or another type's file of the same name."""
    remote = entry.remote
    if remote is not None:
        clash = [t.name for t in TYPES.values() if t.name != entry.name and t.remote is not None and
                 t.remote.name == remote.name and t.remote != remote]
        if clash or (remote.parent != CORE_DIR and (CORE_DIR / remote.name).exists()):
            raise ValueError(f"module type {entry.name}: its remote file {remote.name} has the name of another "
                             f"one ({', '.join(clash) or 'a core file'}); a checkpoint holds them side by side")
    old = TYPES.pop(entry.name, None)
    if old is not None:
        _BY_CLASS.pop(old.cls, None)
        BUILDERS.pop(old.name, None)
    TYPES[entry.name] = _BY_CLASS[entry.cls] = entry
    if entry.build is not None:
        BUILDERS[entry.name] = entry.build
    return entry


def unregister_module_type(name: str) -> None:
    entry = TYPES.pop(name)
    _BY_CLASS.pop(entry.cls, None)
    BUILDERS.pop(name, None)


def module_type(m: nn.Module) -> ModuleType | None:
    """The entry of ``m``'s class or of its nearest registered base class; None for anything else."""
    for cls in type(m).__mro__:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    return None


def is_unit(m: nn.Module) -> bool:
    """True for a Linear-like replacement module (counted and compressed as a whole)."""
    entry = module_type(m)
    return entry is not None and entry.unit


def module_spec(m: nn.Module) -> dict:
    """The config entry describing ``m`` (``lrc.modules[name]``); anything unregistered is a ``dense`` Linear."""
    return (module_type(m) or TYPES["dense"]).spec(m)


def unit_weights(m: nn.Module) -> int:
    """Weights ``m`` multiplies per token (its type's count, else those of its Linears)."""
    entry = module_type(m)
    return entry.weights(m) if entry is not None else linear_weights(m)


def stored_weights(m: nn.Module) -> int:
    """Weights ``m`` holds other than as parameters: integer codes (a quantized Linear's ``stored_weights()``)."""
    return sum(x.stored_weights() for x in m.modules() if hasattr(x, "stored_weights"))


def unit_params(m: nn.Module) -> int:
    """Parameters of ``m`` (weights + biases), quantized weights included (they are weights, stored narrower)."""
    return sum(p.numel() for p in m.parameters()) + stored_weights(m)


def spec_types(spec: dict) -> Iterator[str]:
    """The type of ``spec`` and of every spec nested in it (a value that is itself a spec, e.g. a wrapper's base)."""
    yield spec.get("type")
    for value in spec.values():
        if isinstance(value, dict) and "type" in value:
            yield from spec_types(value)


def loads_lazily(modules: dict) -> bool:
    """True when every type the specs ``modules`` use (nested ones included) can be loaded block by block."""
    return all(name in TYPES and TYPES[name].lazy for spec in modules.values() for name in spec_types(spec))


def describe_spec(spec: dict) -> tuple[str, str]:
    """``lrc info``'s shape and knob columns for one spec."""
    entry = TYPES.get(spec.get("type"))
    return (entry.describe if entry is not None else describe_linear)(spec)


def report_types() -> list[ReportType]:
    """The report row types, each once, in registration order."""
    return list({t.report.word: t.report for t in TYPES.values() if t.report is not None}.values())


def residual_paths(m: nn.Module) -> tuple[str, ...]:
    """The submodules of ``m`` that hold a residual path (``ModuleType.residual``; none for other modules)."""
    entry = module_type(m)
    return entry.residual if entry is not None else ()


def factor_pair(m: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(output factor, input factor)`` of a low-rank product ``m`` (``ModuleType.factors``), else None."""
    entry = module_type(m)
    if entry is None or entry.factors is None:
        return None
    return m.get_submodule(entry.factors[0]), m.get_submodule(entry.factors[1])


def used_types(modules: dict) -> list[ModuleType]:
    """The entries a checkpoint with the specs ``modules`` needs: the core types and every type the specs use, in
    registration order; a ``ValueError`` for a type without a builder."""
    used = {name for spec in modules.values() for name in spec_types(spec)}
    unknown = sorted(n for n in used if n not in TYPES or TYPES[n].build is None)
    if unknown:
        raise ValueError(f"lrc.modules uses module types no checkpoint can build: {', '.join(map(repr, unknown))} "
                         f"(registered with a builder: {', '.join(n for n, t in TYPES.items() if t.build)})")
    return [t for t in TYPES.values() if t.build is not None and (t.core or t.name in used)]


def dense_spec(m: nn.Module) -> dict:
    return {"type": "dense", "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None}


def lowrank_spec(m: LowRankLinear) -> dict:
    return {"type": "lowrank", "in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
            "bias": m.second.bias is not None}


register_module_type(ModuleType(
    "lowrank", LowRankLinear, build_lowrank, lowrank_spec, factors=("second", "first"),
    report=ReportType("lowrank", "factorized", "factorized", always=True, measured=True)))
register_module_type(ModuleType(
    "dense", nn.Linear, build_dense, dense_spec, unit=False,
    report=ReportType("dense", "kept_dense", "kept dense", always=True)))
