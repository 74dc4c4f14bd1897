"""``welore`` allocator (Jaiswal et al., WeLore, arXiv 2407.11239, Sec. 3; methods.md §4).

Per matrix, min-max normalised singular values of the weight, ``σ̃ = (σ − σ_min)/(σ_max − σ_min)``; one global
threshold τ; pruned rank ``k = #{σ̃ < τ}``, kept rank ``min(m, n) − k``. WeLore reads τ from tables fitted to
LLaMA-2 7B/13B; lrc solves τ by bisection for any model and target. ``target: params`` (default): the targeted
parameters after factorisation are at most ``param_ratio`` of the original. ``target: rank``: WeLore's own count,
kept rank ``Σ r / Σ min(m, n)`` at most ``param_ratio`` (rank reduction = 1 − param_ratio), which is **not** a
parameter fraction. Matrices whose kept rank would not save parameters stay dense (WeLore's N-LRC); the others are
factorised (LRC). The spectrum is the plain weight's (data-free), whatever method then factorises.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .budget import bisect, budget_params, params_at, set_rank
from .registry import register_allocator


class WeLoreOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: Literal["params", "rank"] = Field("params", description="what param_ratio counts")


def normalised(sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.double()
    span = float(s.max() - s.min())
    return (s - s.min()) / span if span > 0 else torch.ones_like(s)


def kept_rank(sig_norm: torch.Tensor, tau: float) -> int:
    return int(sig_norm.numel() - int((sig_norm < tau).sum()))


def welore(stage, rows, spectra, options) -> None:
    opts = WeLoreOptions.model_validate(options)
    norm = {r.name: normalised(spectra[r.name]) for r in rows}
    if opts.target == "params":
        budget = budget_params(rows, stage.param_ratio)
        total = (lambda t: sum(params_at(r, max(1, kept_rank(norm[r.name], t))) for r in rows))
    else:
        budget = stage.param_ratio * sum(min(r.out_features, r.in_features) for r in rows)
        total = (lambda t: sum(max(1, kept_rank(norm[r.name], t)) for r in rows))
    tau = bisect(total, 0.0, 1.0 + 1e-9, budget, increasing=False)
    for r in rows:
        k = kept_rank(norm[r.name], tau)
        set_rank(r, k, f"welore τ={tau:.4f}")
        r.note = ("LRC; " if r.factorize else "N-LRC; ") + r.note


register_allocator("welore", welore, reads="weights", options=WeLoreOptions,
                   description="WeLore (Jaiswal et al., arXiv 2407.11239): one global threshold on normalised weight "
                               "singular values; matrices that would not save parameters stay dense")
