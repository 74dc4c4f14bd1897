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
        new, info = self._compensated(module, original, stats["input_gram"], row.rank)
        note = f"error {info['base_error']:.4f} -> {info['rel_error']:.4f}" + \
            (f"; {info['dropped_eigenvalues']} Gram eigenvalues dropped" if info["dropped_eigenvalues"] else "")
        return new, report_row(row, "compensated", info["rel_error"], time.perf_counter() - t0, note, rank=new.rank,
                               base_error=info["base_error"], dropped_eigenvalues=info["dropped_eigenvalues"])

    @torch.no_grad()
    def repair(self, module: nn.Module, original: torch.Tensor, gram: torch.Tensor | None, rank: int
               ) -> tuple[nn.Module, dict]:
        """``quantize.compensate``: the quantized ``module`` plus the residual repairing ``original − Q(original)``
        on the compressed model's inputs (EoRA's use in the paper: GPTQ's error); no Gram (an embedding) is refused."""
        if gram is None:
            raise ValueError("EoRA needs the input Gram of the module it repairs")
        new, info = self._compensated(module, original, gram, rank)
        info["residual_bytes"] = sum(p.numel() * p.element_size()
                                     for p in (new.lora_A.weight, new.lora_B.weight))
        return new, info

    def _compensated(self, module: nn.Module, original: torch.Tensor, H: torch.Tensor, rank: int
                     ) -> tuple[CompensatedLinear, dict]:
        """The residual of rank ``rank`` (at most the error's) for ``original − module`` (eq. in ``math.py``) as a
        ``CompensatedLinear`` in ``module``'s float dtype, and its weighted errors before and after."""
        dev, dtype = original.device, _float_dtype(module)
        W, Wc, H = original.double(), effective_weight(module).to(dev), H.double().to(dev)
        res = eora_residual(W - Wc, H, rank, self.config.rtol)
        new = CompensatedLinear(module, res.B.shape[1], device=dev, dtype=dtype)
        new.lora_A.weight.copy_(res.A)
        new.lora_B.weight.copy_(res.B)
        before = weighted_error(W, Wc, H)
        after = weighted_error(W, effective_weight(new).to(dev), H)
        return new, {"rank": new.rank, "base_error": before, "rel_error": after, "dropped_eigenvalues": res.dropped}

    def wrap_sigma(self, delta: torch.Tensor, stats: dict) -> torch.Tensor:
        """Singular values of the whitened residual ``ΔW Q Λ^{1/2}`` (``math.residual_spectrum``)."""
        return residual_spectrum(delta, stats["input_gram"], self.config.rtol)
