"""EoRA as a stage (Liu et al., arXiv 2410.21271; methods.md §7): after any earlier stage, add the residual path
``B A`` that best repairs ``ΔW = W − W_c`` on the compressed model's own inputs (``compress.compensation.eora``).

The engine keeps each block's original weights until the block's stages are done and collects the input Gram
through the already-compressed (and, within the block, already-compensated) modules.
"""
from __future__ import annotations

from pydantic import Field

from ..compensation.eora import DEFAULT_RTOL
from .base import Method, MethodConfig, register


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
    # a residual repairs ΔW = W − W_c of the same shape, fitted as the block is compressed: not a resized module
    # (MoDeGPT's) nor a shared dictionary (fitted blocks later, when its group is complete)
    acts_on = frozenset({"dense", "lowrank", "dictionary", "compensated"})

    def leaves(self) -> str:
        return "compensated"
