"""EoRA's module type ``compensated`` as lrc's registry sees it (``checkpoint/module_types.py``; the class and its
builder are the remote-code file ``lrc_compensated.py``)."""
from __future__ import annotations

from ...checkpoint.module_types import ModuleType, ReportType, module_spec, unit_weights
from .lrc_compensated import CompensatedLinear, build_compensated


def compensated_spec(m: CompensatedLinear) -> dict:
    return {"type": "compensated", "in_features": m.in_features, "out_features": m.out_features,
            "rank": m.rank, "base": module_spec(m.base)}


def compensated_weights(m: CompensatedLinear) -> int:
    """The base's count (as its own module type counts it) plus the residual path's."""
    return unit_weights(m.base) + m.lora_A.weight.numel() + m.lora_B.weight.numel()


COMPENSATED = ModuleType(
    "compensated", CompensatedLinear, build_compensated, compensated_spec, weights=compensated_weights,
    residual=("lora_A", "lora_B"),
    report=ReportType("compensated", "compensated", "compensated", always=True, measured=True, repair=True))
