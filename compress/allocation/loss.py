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

from .budget import max_saving_rank, params_at, set_rank


class LossOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: bool = Field(True, description="relative (per-matrix normalised) instead of absolute loss")


def module_type(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name, count=1)


def _candidates(r, spectrum, normalize: bool) -> list[tuple[float, str]]:
    """Each extra direction of ``r`` after the first, valued by the loss it removes per parameter it costs."""
    s2 = spectrum.double() ** 2
    total = float(s2.sum()) if normalize else 1.0
    cost = r.out_features + r.in_features
    return [(float(s2[j]) / (total or 1.0) / cost, r.name) for j in range(1, max_saving_rank(r))]


def _take(candidates, ranks, cost_of, used: int, budget: float) -> int:
    """Walk candidates by value; add a direction wherever it still fits (each matrix's are in order)."""
    for _, name in candidates:
        if used + cost_of[name] <= budget:
            ranks[name] += 1
            used += cost_of[name]
    return used


def loss(stage, rows, spectra, options) -> None:
    opts = LossOptions.model_validate(options)
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(module_type(r.name), []).append(r)
    cost_of = {r.name: r.out_features + r.in_features for r in rows}
    ranks = {r.name: 1 for r in rows}  # every factorised matrix keeps at least one direction
    leftovers, used = [], 0
    for members in groups.values():
        budget = stage.param_ratio * sum(r.params_before for r in members)
        cands = sorted((c for r in members for c in _candidates(r, spectra[r.name], opts.normalize)),
                       key=lambda c: -c[0])
        base = sum(params_at(r, 1) for r in members)
        taken = _take(cands, ranks, cost_of, base, budget) - base
        used += base + taken
        leftovers += _remaining(cands, ranks, members)
    # the groups' rounding leaves less than one direction each: spend it on the best remaining ones overall
    _take(sorted(leftovers, key=lambda c: -c[0]), ranks, cost_of, used,
          stage.param_ratio * sum(r.params_before for r in rows))
    for r in rows:
        set_rank(r, ranks[r.name], f"loss-allocated ({module_type(r.name)})")


def _remaining(cands, ranks, members) -> list:
    seen = {r.name: 1 for r in members}
    out = []
    for c in cands:
        seen[c[1]] += 1
        if seen[c[1]] > ranks[c[1]]:
            out.append(c)
    return out
