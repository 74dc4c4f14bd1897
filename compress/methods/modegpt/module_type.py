"""MoDeGPT's module type ``attention`` as lrc's registry sees it (``checkpoint/module_types.py``; the class and its
builder are the remote-code file ``lrc_attention.py``). Its q/k/v/o stay plain Linears, units of their own for a
later stage; MoDeGPT's report rows are its units (``structured``: attention and MLP), counted per block."""
from __future__ import annotations

from ...checkpoint.module_types import ModuleType, ReportType
from .lrc_attention import LrcAttention, build_attention


def describe_attention(spec: dict) -> tuple[str, str]:
    """``lrc info``: per-layer head dims, q/k and v/o of the original head dim."""
    d = spec["head_dim"]
    return (f"{spec['num_heads']} heads, {spec['num_kv_heads']} KV heads",
            f"q/k {spec['qk_dim']}/{d}, v/o {spec['vo_dim']}/{d}")


ATTENTION = ModuleType(
    "attention", LrcAttention, build_attention, LrcAttention.spec, unit=False, describe=describe_attention,
    report=ReportType("structured", "structured_units", "structured (groups of Linears rebuilt smaller)",
                      measured=True, units=True,
                      columns=(("dropped_score_share", "rel_error"),)))  # q/k units: their rel_error is not measured
