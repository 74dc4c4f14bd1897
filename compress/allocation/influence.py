"""Block-influence allocation (MoDeGPT, Lin et al., arXiv 2408.09632, Sec. 3.4; methods.md §5 "Layer allocation").

Each block's importance is ``s_l = 1 − E_t cos(h_l, h_{l+1})``, the mean cosine between its input and output hidden
states on the dense model (measured in the engine's dense pre-pass, ``engine/spectra.py``). The share removed from
block l is ``φ_l = L·φ_avg·softmax(−s_l/ε)``, capped at ``phi_max`` with the excess given back to the other blocks so
the mean stays ``φ_avg = 1 − param_ratio`` (``structured.block_influence_phi``). Every unit of block l then keeps
``1 − φ_l`` of its dims through its cost model; blocks that barely change the residual stream lose the most. A
low-rank method's Linears get the rank keeping ``1 − φ_l`` of each matrix the same way (``svd-llm`` with MoDeGPT's
allocation).
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from .registry import register_allocator


class BlockInfluenceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(0.15, gt=0, description="softmax temperature ε (unofficial default 0.15; smaller "
                                                   "concentrates the removal on the least influential blocks)")
    phi_max: float = Field(0.9, gt=0, le=1, description="cap on the share removed from any one block")


def influence_key(block: int) -> str:
    """Where the pre-pass stores block ``block``'s score in the allocation tensors."""
    return f"block_influence.{block}"


def block_influence(stage, rows, spectra: dict, options: dict) -> None:
    """Set every unit's knob from its block's share ``1 − φ_l`` (rows of one stage; ``spectra`` holds the scores)."""
    from ..errors import LrcError
    from ..plan_units import allocate_units
    from .cost import cost_of
    from .uniform import decide
    from ..structured import block_influence_phi

    opts = BlockInfluenceOptions.model_validate(options)
    blocks = sorted({r.block for r in rows})
    n_all = 1 + max(int(k.rsplit(".", 1)[1]) for k in spectra if k.startswith("block_influence."))
    scores = torch.tensor([float(spectra[influence_key(i)]) for i in range(n_all)], dtype=torch.float64)
    phi_avg = 1 - stage.param_ratio
    if phi_avg > opts.phi_max:
        raise LrcError(f"allocator_options.phi_max: {opts.phi_max} is below the average share removed "
                       f"{phi_avg:.4f} (param_ratio {stage.param_ratio}); raise phi_max")
    sel = torch.tensor(blocks)
    phi = block_influence_phi(scores[sel], phi_avg, opts.epsilon, opts.phi_max)
    kept = {b: 1 - float(p) for b, p in zip(blocks, phi)}
    allocate_units(stage, [r for r in rows if hasattr(r, "members")], kept)
    for r in rows:  # single Linears (a low-rank method): the rank keeping the block's share of this matrix
        if not hasattr(r, "members"):
            decide(r, cost_of(r).knob_for(r, kept[r.block]))
            r.note = (f"{r.note}; " if r.note else "") + f"block share {kept[r.block]:.4f} (block influence)"


register_allocator("block_influence", block_influence, "influence",
                   "MoDeGPT (Lin et al., arXiv 2408.09632): φ_l = L·φ_avg·softmax(−s_l/ε) per block from its "
                   "influence s_l = 1 − cos(h_in, h_out), capped at phi_max; for structured units",
                   BlockInfluenceOptions, unit_kinds=("linear", "mlp", "qk", "vo"),
                   needs="block influence 1 − cos(block input, output) (dense pre-pass)")
