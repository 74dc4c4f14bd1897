"""EoRA's module type ``compensated`` as lrc's registry sees it (``checkpoint/module_types.py``; the class and its
builder are the remote-code file ``lrc_compensated.py``)."""
from __future__ import annotations

from ...checkpoint.module_types import TYPES, ModuleType, ReportType, module_spec, unit_weights
from .lrc_compensated import CompensatedLinear, build_compensated


def compensated_spec(m: CompensatedLinear) -> dict:
    return {"type": "compensated", "in_features": m.in_features, "out_features": m.out_features,
            "rank": m.rank, "base": module_spec(m.base)}


def compensated_weights(m: CompensatedLinear) -> int:
    """The base's count (as its own module type counts it) plus the residual path's."""
    return unit_weights(m.base) + unit_weights(m.lora_A) + unit_weights(m.lora_B)


def describe_compensated(spec: dict) -> tuple[str, str]:
    """``lrc info``: the base's knob (e.g. ``int3/g32``, a rank) and the residual's rank."""
    base = spec["base"]
    shape, knob = TYPES[base.get("type", "dense")].describe(base)
    return shape, (f"{knob} + " if knob != "-" else "") + f"residual {spec['rank']}"


COMPENSATED = ModuleType(
    "compensated", CompensatedLinear, build_compensated, compensated_spec, weights=compensated_weights,
    residual=("lora_A", "lora_B"), describe=describe_compensated,
    report=ReportType("compensated", "compensated", "compensated", always=True, measured=True, repair=True))
