"""``loss`` allocator, after SVD-LLM V2's heterogeneous allocation (Wang et al., arXiv 2503.12340; methods.md §3c).

Matrices are grouped by module type across blocks (all q_proj, all down_proj, ...). Each group keeps the parameters
the uniform ratio would give it, but redistributes them: ranks go where they remove the most truncation loss, i.e.
the group's kept singular values are the largest ``σ_j²`` (per parameter) among all its matrices. With the
whitened spectrum that loss is exactly ``||(W − W')X||²`` (SVD-LLM Theorem 3.2), so the allocation minimises the
group's summed loss under its budget. The paper's closed-form ratio formula is ambiguous (issue #46 of its repo);
this greedy form is exact for the stated goal. ``normalize: true`` (default) divides each matrix's σ² by its total
energy (relative loss), so deep layers with large activations do not take every rank; ``false`` uses absolute loss.
"""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from ..linalg import rank_for_ratio
from .budget import max_saving_rank, params_at, set_rank


class LossOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: bool = Field(True, description="relative (per-matrix normalised) instead of absolute loss")


def module_type(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name, count=1)


def loss(stage, rows, spectra, options) -> None:
    opts = LossOptions.model_validate(options)
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(module_type(r.name), []).append(r)
    for members in groups.values():
        budget = sum(params_at(r, rank_for_ratio(r.out_features, r.in_features, stage.param_ratio, stage.align))
                     for r in members)
        candidates = []
        for r in members:
            s2 = spectra[r.name].double() ** 2
            total = float(s2.sum()) if opts.normalize else 1.0
            cost = r.out_features + r.in_features
            cap = max_saving_rank(r)
            for j in range(cap):
                candidates.append((float(s2[j]) / (total or 1.0) / cost, r.name))
        candidates.sort(key=lambda c: -c[0])
        cost_of = {r.name: r.out_features + r.in_features for r in members}
        ranks = {r.name: 1 for r in members}  # every factorised matrix keeps at least one direction
        used = sum(params_at(r, 1) for r in members)
        taken = {r.name: 0 for r in members}
        for _, name in candidates:
            taken[name] += 1
            if taken[name] == 1:  # the first direction is already paid for
                continue
            if used + cost_of[name] > budget:
                continue
            ranks[name] += 1
            used += cost_of[name]
        for r in members:
            set_rank(r, ranks[r.name], f"loss-allocated ({module_type(r.name)})")
