"""The ``quant`` module type as lrc's registry sees it (``checkpoint/module_types.py``; the class and its builder are
the remote-code file ``lrc_quant.py``)."""
from __future__ import annotations

from ..checkpoint.module_types import ModuleType, register_module_type
from .lrc_quant import QuantLinear, build_quant

SCALE_NAMES = {"torch.float16": "float16", "torch.bfloat16": "bfloat16", "torch.float32": "float32"}


def quant_spec(m: QuantLinear) -> dict:
    return {"type": "quant", "in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
            "group_size": m.group_size, "symmetric": m.symmetric, "scale_dtype": SCALE_NAMES[str(m.scales.dtype)],
            "bias": m.bias is not None}


def quant_weights(m: QuantLinear) -> int:
    """Weights multiplied per token: the matrix's, whatever their width."""
    return m.in_features * m.out_features


def describe_quant(spec: dict) -> tuple[str, str]:
    g = spec.get("group_size")
    return f"{spec['out_features']} x {spec['in_features']}", \
        f"int{spec['bits']}" + (f"/g{g}" if g else "") + (" sym" if spec.get("symmetric") else "")


QUANT = register_module_type(ModuleType("quant", QuantLinear, build_quant, quant_spec, weights=quant_weights,
                                        describe=describe_quant))
