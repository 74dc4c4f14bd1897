"""EoRA as a stage (Liu et al., arXiv 2410.21271; methods.md §7): after any earlier stage, add the residual path
``B A`` that best repairs ``ΔW = W − W_c`` on the compressed model's own inputs (the math: ``eora/math.py``).

A ``wrap`` method (``Method.replacement``): the engine keeps each block's original weights until the block's stages
are done, collects the input Gram through the already-compressed (and, within the block, already-compensated)
modules, and hands each module with its original weight to ``EoRA.wrap``, which returns a ``CompensatedLinear``
around it. A global allocator of residual ranks reads ``wrap_sigma`` (``allocation/residual.py``).
"""
from __future__ import annotations

import time

import torch
from pydantic import Field
from torch import nn

from ...checkpoint.module_types import effective_weight, register_module_type
from ...linalg import weighted_error
from ...report_row import report_row
from ..base import MODULE_KINDS, Method, MethodConfig, register
from ...checkpoint.lrc_layers import _float_dtype
from .lrc_compensated import CompensatedLinear
from .math import DEFAULT_RTOL, Residual, eora_residual, residual_spectrum
from .module_type import COMPENSATED

__all__ = ["DEFAULT_RTOL", "CompensatedLinear", "EoRA", "EoRAConfig", "Residual", "eora_residual",
           "residual_spectrum"]

MODULE_KINDS["compensated"] = "a module with a residual path"
register_module_type(COMPENSATED)


class EoRAConfig(MethodConfig):
    rtol: float = Field(DEFAULT_RTOL, gt=0, lt=1, description="input-Gram eigenvalues <= rtol·λ_max are dropped")


@register
class EoRA(Method):
    name = "eora"
    description = "EoRA compensation: eigenspace low-rank residual B·A added to an earlier stage's compressed weight"
    paper = "Liu et al., EoRA, arXiv 2410.21271, Sec. 3"
    config_cls = EoRAConfig
    needs = ("input_gram",)
    kind = "compensation"
    replacement = "wrap"
    # a residual repairs ΔW = W − W_c of the same shape, fitted as the block is compressed: not a resized module
    # (MoDeGPT's) nor a shared dictionary (fitted blocks later, when its group is complete)
    acts_on = frozenset({"dense", "lowrank", "dictionary", "compensated"})

    def leaves(self) -> str:
        return "compensated"

    @torch.no_grad()
    def wrap(self, module: nn.Module, original: torch.Tensor, stats: dict, row) -> tuple[nn.Module, dict]:
        """``module`` (whatever an earlier stage left) plus the residual repairing ``original − module``."""
        t0 = time.perf_counter()
        delta = original.double() - effective_weight(module)
        res = eora_residual(delta, stats["input_gram"], row.rank, self.config.rtol)
        dev, dtype = original.device, _float_dtype(module)
        new = CompensatedLinear(module, res.B.shape[1], device=dev, dtype=dtype)
        new.lora_A.weight.copy_(res.A)
        new.lora_B.weight.copy_(res.B)
        H = stats["input_gram"]
        before_err = weighted_error(original.double(), effective_weight(module), H)
        after_err = weighted_error(original.double(), effective_weight(new), H)
        note = f"error {before_err:.4f} -> {after_err:.4f}" + \
            (f"; {res.dropped} Gram eigenvalues dropped" if res.dropped else "")
        return new, report_row(row, "compensated", after_err, time.perf_counter() - t0, note, rank=new.rank,
                               base_error=before_err, dropped_eigenvalues=res.dropped)

    def wrap_sigma(self, delta: torch.Tensor, stats: dict) -> torch.Tensor:
        """Singular values of the whitened residual ``ΔW Q Λ^{1/2}`` (``math.residual_spectrum``)."""
        return residual_spectrum(delta, stats["input_gram"], self.config.rtol)
