"""lrc's core module types (imports only torch): ``lowrank`` (``LowRankLinear``) and ``dense`` (a plain
``nn.Linear``, possibly resized), with their builders. Part of every lrc checkpoint's remote code: ``lrc_types.py``
and ``modeling_lrc.py`` import it relatively, and so may the file of a method's own module type; transformers copies
it beside ``modeling_lrc.py`` when it loads the checkpoint with ``trust_remote_code=True``.

A module type's file defines the class and its builder ``build_<type>(spec, dtype=None, base=None, build=None)``
(``spec``: the module's entry in ``lrc.modules``; ``base``: the module it replaces; ``build``: ``modeling_lrc``'s
``build_module``, for a spec nested in this one). A class may define two hooks that ``modeling_lrc`` calls on every
module that has them: ``lrc_fast_path(fast, fuse, layout)`` (``set_fast_path``) and ``lrc_link(find)`` (once the
whole structure is built: ``find(name)`` is the module of that full name in ``lrc.modules``, or None).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lrc_fast import FAST_PATH, first_output, plain, prefer_layout


class LowRankLinear(nn.Module):
    """``y = second(first(x))``: ``first`` is ``B`` (rank x in, no bias), ``second`` is ``A`` (out x rank, bias).

    Stores ``rank * (in + out)`` weights instead of ``in * out``. Drop-in for ``nn.Linear`` (same in/out features).

    With ``fast`` (default unless ``LRC_FAST_PATH=0``) the forward applies the factors' parameters with ``F.linear``
    directly (the factors' module calls cost more than the product at batch 1), and with ``fuse`` the first factor
    goes through ``lrc_fast.first_output``: one GEMM with the modules that receive the same input tensor. Factors
    that are no plain hook-free ``nn.Linear`` (a PEFT wrapper, a hook) are always called as modules.
    """

    # fusion is switched on per instance when a checkpoint loads (``modeling_lrc.set_fast_path``): modules the
    # compressor builds and runs never fuse, so compression results do not depend on it
    fast, fuse, _group, _group_index = FAST_PATH, False, None, None

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def weight_approx(self) -> torch.Tensor:
        """The dense matrix ``A B`` this module applies (materialised; for analysis, not for the forward)."""
        return self.second.weight @ self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self._modules["first"], self._modules["second"]
        if not (self.fast and plain(first) and plain(second)):
            return second(first(x))
        h = first_output(self, x, first._parameters["weight"])
        return F.linear(h, second._parameters["weight"], second._parameters["bias"])

    def lrc_fast_path(self, fast: bool, fuse: bool, layout: bool) -> None:
        """``modeling_lrc.set_fast_path``: the fast path, fusion (leaving its group when off) and the factors'
        layout."""
        self.fast, self.fuse = fast, fast and fuse
        if self._group is not None and not self.fuse:
            self._group.dissolve()
        prefer_layout(self.first, layout)
        prefer_layout(self.second, layout)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_group": None, "_group_index": None}  # a copy finds its own group

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.second.bias is not None}")


def _float_dtype(module: nn.Module):
    """The dtype of ``module``'s first floating-point parameter: a module replaced earlier (a ``LowRankLinear``, any
    lrc module) has no ``.weight`` of its own, and its replacement must keep the model's dtype."""
    hint = getattr(module, "compute_dtype", None)  # a module holding its weights as integer codes says it
    return hint or next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def build_lowrank(spec: dict, dtype=None, base=None, build=None) -> nn.Module:
    """``lowrank``: ``in_features``, ``out_features``, ``rank``, ``bias``."""
    return LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], spec.get("bias", False), dtype=dtype)


def build_dense(spec: dict, dtype=None, base=None, build=None) -> nn.Module:
    """``dense``: a plain ``nn.Linear`` of ``in_features``, ``out_features`` (a resized matrix keeps its type)."""
    return nn.Linear(spec["in_features"], spec["out_features"], bias=spec.get("bias", False), dtype=dtype)
