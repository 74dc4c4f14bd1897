"""EoRA's module type ``compensated`` (imports only torch and lrc's core remote files): ``CompensatedLinear``, any
lrc module (``base``) plus a low-rank residual path. Written into the remote code of every checkpoint that has one
(``checkpoint/save.py``: its imports of the core files are made relative to the checkpoint directory there)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoint.lrc_fast import FAST_PATH, plain, prefer_layout


class CompensatedLinear(nn.Module):
    """``y = base(x) + lora_B(lora_A(x))``: a compressed module plus a low-rank residual path (EoRA). The residual
    uses PEFT's names and shapes (``lora_A`` rank x in, ``lora_B`` out x rank, scaling 1). With ``fast`` the residual
    path applies its parameters directly, as ``LowRankLinear`` does. ``quantize.compensate.bits`` below 16 makes the
    two factors quantized Linears (specs of their own, ``<module>.lora_A``, built after this one)."""

    fast = FAST_PATH

    def __init__(self, base: nn.Module, rank: int, device=None, dtype=None):
        super().__init__()
        self.base, self.rank = base, rank
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)

    @property
    def weight_approx(self) -> torch.Tensor:
        """The dense matrix applied: the base's plus ``B A`` (either factor may itself be quantized)."""
        def w(m):
            return m.weight_approx if hasattr(m, "weight_approx") else m.weight

        b, a = w(self.lora_B), w(self.lora_A)
        return w(self.base) + (b.to(a.dtype) @ a).to(b.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._modules["lora_A"], self._modules["lora_B"]
        if not (self.fast and plain(a) and plain(b)):
            return self.base(x) + b(a(x))
        return self.base(x) + F.linear(F.linear(x, a._parameters["weight"]), b._parameters["weight"])

    def lrc_fast_path(self, fast: bool, fuse: bool, layout: bool) -> None:
        """``modeling_lrc.set_fast_path``: the residual path's fast path and its factors' layout (the base has its
        own hook)."""
        self.fast = fast
        prefer_layout(self.lora_A, layout)
        prefer_layout(self.lora_B, layout)


def build_compensated(spec: dict, dtype=None, base=None, build=None) -> nn.Module:
    """``compensated``: ``base`` (the spec of the module it wraps, built by ``build``) and the residual ``rank``."""
    return CompensatedLinear(build(spec["base"], dtype=dtype, base=base), spec["rank"], dtype=dtype)
