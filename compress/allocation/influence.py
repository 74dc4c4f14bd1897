"""Block-influence allocation (MoDeGPT's global sparsity allocation: Lin et al., ICLR 2025, arXiv 2408.09632,
Sec. 3.4; methods.md §5 "Layer allocation").

Each block's importance is ``s_l = 1 − E_t cos(h_l, h_{l+1})``, the mean cosine between its input and output hidden
states on the dense model (``cosine_influence``, summed in the engine's dense pre-pass, ``engine/spectra.py``). The
share removed from block l is ``φ_l = L·φ_avg·softmax(−s_l/ε)``, capped at ``phi_max`` with the excess given back to
the other blocks so the mean stays ``φ_avg = 1 − param_ratio`` (``block_influence_phi``). Every unit of block l then
keeps ``1 − φ_l`` of its dims through its cost model; blocks that barely change the residual stream lose the most.
A low-rank method's Linears get the rank keeping ``1 − φ_l`` of each matrix the same way (``svd-llm`` with MoDeGPT's
allocation).

It lives here, not with MoDeGPT (``methods/modegpt/``): the statistic is a property of the dense model, not of a
method, and the allocation goes through each row's cost model, so it allocates any method's rows.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import LrcError
from .cost import cost_of
from .registry import register_allocator
from .uniform import decide
from .units import allocate_units

_F64 = torch.float64


class BlockInfluenceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(0.15, gt=0, description="softmax temperature ε (unofficial default 0.15; smaller "
                                                   "concentrates the removal on the least influential blocks)")
    phi_max: float = Field(0.9, gt=0, le=1, description="cap on the share removed from any one block")


def influence_key(block: int) -> str:
    """Where the pre-pass stores block ``block``'s score in the allocation tensors."""
    return f"block_influence.{block}"


def cosine_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> tuple[float, int]:
    """Per-token ``cos(h_l, h_{l+1})`` of a block's input and output hidden states (..., h), summed in float64.

    The engine sums over batches; the block influence is ``s_l = 1 − sum / tokens`` (MoDeGPT §3.3). A zero vector
    counts as cosine 0.
    """
    if x_in.shape != x_out.shape:
        raise ValueError(f"cosine_influence: shapes differ, {tuple(x_in.shape)} vs {tuple(x_out.shape)}")
    a = x_in.reshape(-1, x_in.shape[-1]).to(_F64)
    b = x_out.reshape(-1, x_out.shape[-1]).to(_F64)
    den = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(torch.finfo(_F64).tiny)
    return float(((a * b).sum(1) / den).sum()), int(a.shape[0])


def block_influence_phi(scores: torch.Tensor, phi_avg: float, epsilon: float, phi_max: float) -> torch.Tensor:
    """Per-layer sparsity ``φ_l = L · φ_avg · softmax(−s_l / ε)`` capped at ``φ_max`` (MoDeGPT global allocation).

    Layers with a smaller influence ``s_l`` lose more. The excess over ``φ_max`` is given to the uncapped layers in
    proportion to their softmax weights (softmax over the uncapped set: no underflow), until none exceeds, so
    ``mean(φ) = φ_avg`` to round-off. ``ε → ∞`` gives the uniform ``φ_avg``. Returns (L,) float64.
    """
    s = torch.as_tensor(scores).detach().to("cpu", _F64).reshape(-1)
    if s.numel() == 0 or not torch.isfinite(s).all():
        raise ValueError("block_influence_phi: scores must be a non-empty finite vector")
    if not 0 <= phi_avg < 1 or not 0 < phi_max <= 1 or not epsilon > 0:
        raise ValueError(f"block_influence_phi: need 0 <= phi_avg < 1, 0 < phi_max <= 1, epsilon > 0; got "
                         f"phi_avg={phi_avg}, phi_max={phi_max}, epsilon={epsilon}")
    if phi_avg > phi_max:
        raise ValueError(f"block_influence_phi: phi_avg={phi_avg} > phi_max={phi_max} is infeasible")
    L = s.numel()
    logits = -s / epsilon
    capped = torch.zeros(L, dtype=torch.bool)
    phi = torch.empty(L, dtype=_F64)
    for _ in range(L + 1):
        free = ~capped
        budget = L * phi_avg - phi_max * int(capped.sum())
        phi[capped] = phi_max
        if not free.any():
            break
        phi[free] = max(budget, 0.0) * torch.softmax(logits[free], 0)
        over = free & (phi > phi_max)
        if not over.any():
            break
        capped |= over
    return phi


def block_influence(stage, rows, spectra: dict, options: dict) -> None:
    """Set every unit's knob from its block's share ``1 − φ_l`` (rows of one stage; ``spectra`` holds the scores)."""
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
    allocate_units(stage, [r for r in rows if not r.linear], kept)
    for r in rows:  # single Linears (a low-rank method): the rank keeping the block's share of this matrix
        if r.linear:
            decide(r, cost_of(r).knob_for(r, kept[r.block]))
            r.note = (f"{r.note}; " if r.note else "") + f"block share {kept[r.block]:.4f} (block influence)"


register_allocator("block_influence", block_influence, "influence",
                   "MoDeGPT (Lin et al., arXiv 2408.09632): φ_l = L·φ_avg·softmax(−s_l/ε) per block from its "
                   "influence s_l = 1 − cos(h_in, h_out), capped at phi_max; for structured units",
                   BlockInfluenceOptions, unit_kinds=("linear", "mlp", "qk", "vo"),
                   needs="block influence 1 − cos(block input, output) (dense pre-pass)")
