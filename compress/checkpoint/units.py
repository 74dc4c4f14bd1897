"""Registry of lrc's replacement modules (``modeling_lrc.py``): which module classes lrc treats as one unit, how
each is described in the checkpoint config (``lrc.modules``) and counted.

A unit is one Linear-like module as lrc sees it: a plain ``nn.Linear``, or a registered replacement as a whole (its
inner Linears are no units of their own: ``plan.linear_units``). Each ``UnitType`` has ``spec(module)``, the module's
config entry (a ``MODULE_TYPES`` type of ``modeling_lrc``), and ``weights(module)``, the weights it multiplies per
token (biases excluded; by default those of its inner Linears, as ``lrc bench`` counts them). Anything unregistered is
described as a ``dense`` Linear.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .modeling_lrc import CompensatedLinear, DictLinear, LowRankLinear


def linear_weights(m: nn.Module) -> int:
    """Weights of every ``nn.Linear`` in ``m`` (itself included)."""
    return sum(x.weight.numel() for x in m.modules() if isinstance(x, nn.Linear))


@dataclass(frozen=True)
class UnitType:
    cls: type
    spec: Callable[[nn.Module], dict]
    weights: Callable[[nn.Module], int] = linear_weights


UNIT_TYPES: dict[type, UnitType] = {}


def register_unit_type(cls: type, spec_fn: Callable[[nn.Module], dict],
                       weights: Callable[[nn.Module], int] = linear_weights) -> UnitType:
    """Make ``cls`` (and its subclasses) a unit whose config entry is ``spec_fn(module)``."""
    UNIT_TYPES[cls] = entry = UnitType(cls, spec_fn, weights)
    return entry


def unit_type(m: nn.Module) -> UnitType | None:
    """The entry of ``m``'s class or of its nearest registered base class; None for anything else."""
    for cls in type(m).__mro__:
        if cls in UNIT_TYPES:
            return UNIT_TYPES[cls]
    return None


def is_unit(m: nn.Module) -> bool:
    """True for a registered replacement module (counted and compressed as a whole)."""
    return unit_type(m) is not None


def module_spec(m: nn.Module) -> dict:
    """The config entry describing ``m`` (``lrc.modules[name]``; see ``checkpoint/modeling_lrc.py``)."""
    entry = unit_type(m)
    return entry.spec(m) if entry is not None else dense_spec(m)


def unit_weights(m: nn.Module) -> int:
    """Weights ``m`` multiplies per token (a registered unit's count, else those of its Linears)."""
    entry = unit_type(m)
    return entry.weights(m) if entry is not None else linear_weights(m)


def unit_params(m: nn.Module) -> int:
    """Parameters of ``m`` (weights + biases)."""
    return sum(p.numel() for p in m.parameters())


def dense_spec(m: nn.Module) -> dict:
    return {"type": "dense", "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None}


def lowrank_spec(m: LowRankLinear) -> dict:
    return {"type": "lowrank", "in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
            "bias": m.second.bias is not None}


def compensated_spec(m: CompensatedLinear) -> dict:
    return {"type": "compensated", "in_features": m.in_features, "out_features": m.out_features,
            "rank": m.rank, "base": module_spec(m.base)}


def compensated_weights(m: CompensatedLinear) -> int:
    """The base's count (as its own unit type counts it) plus the residual path's."""
    return unit_weights(m.base) + m.lora_A.weight.numel() + m.lora_B.weight.numel()


def dictionary_spec(m: DictLinear) -> dict:
    spec = {"type": "dictionary", "in_features": m.in_features, "out_features": m.out_features, "atoms": m.atoms,
            "nnz": m.nnz, "bias": m.bias is not None}
    return spec if m.shared_from is None else {**spec, "shared_from": m.shared_from}


def dictionary_weights(m: DictLinear) -> int:
    """The multiply-adds per token the forward executes (``lrc bench``'s FLOP-ideal speed-up must match what runs):
    ``atoms * (in + out)`` on the factored path (the coefficients densified), ``in * out`` on the dense one. The
    sparse count ``atoms * in + nnz * out`` (CoSpaDi §3.4) would need sparse kernels, which gain little at 50%
    density; every module applies the dictionary to its own input, shared or not."""
    if m.exec_path == "factored":
        return m.atoms * (m.in_features + m.out_features)
    return m.in_features * m.out_features


register_unit_type(LowRankLinear, lowrank_spec)
register_unit_type(CompensatedLinear, compensated_spec, weights=compensated_weights)
register_unit_type(DictLinear, dictionary_spec, weights=dictionary_weights)
