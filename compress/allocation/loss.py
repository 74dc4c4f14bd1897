"""``loss`` allocator, after SVD-LLM V2's heterogeneous allocation (Wang et al., arXiv 2503.12340; methods.md §3c).

Matrices are grouped by module type across blocks (all q_proj, all down_proj, ...). Each group keeps the parameters
the uniform ratio would give it (``param_ratio`` of its own), but redistributes them by truncation loss, which with
the whitened spectrum is exactly ``||(W − W')X||²`` (SVD-LLM Theorem 3.2). The paper's closed-form ratio formula is
ambiguous (issue #46 of its repo). What rounding leaves of the budget goes, direction by direction, to the largest
remaining ``σ_j²`` per parameter, so the result is within one rank step of ``param_ratio``.
``mode: ratio`` (default) follows the paper's intent with lrc's own normalisation: each matrix's removal fraction is
proportional to ``log(1/ℓ_i)`` with ``ℓ_i`` its relative whitened truncation loss at the uniform ratio (more loss →
less removal), scaled to fit the group's budget exactly. ``mode: greedy`` is the exact minimiser of the group's summed
loss instead (measured worse: it lets a few matrices lose much). ``normalize: true`` (default) uses relative loss,
``false`` absolute loss. For a compensation stage (EoRA residual ranks) see ``residual.py``.
"""
from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .budget import bisect, max_saving_rank, params_at, set_rank
from .cost import cost_of
from .registry import register_allocator
from .residual import residual_loss


class LossOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["ratio", "greedy"] = Field("ratio", description="ratio: V2-style smooth reallocation; greedy: "
                                                                  "minimum summed loss")
    normalize: bool = Field(True, description="relative (per-matrix normalised) instead of absolute loss")


def module_type(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name, count=1)


def _candidates(r, spectrum, normalize: bool) -> list[tuple[float, str, int]]:
    """Each extra direction of ``r`` after the first, valued by the loss it removes per parameter it costs:
    ``(value, name, cost)``, the cost from the row's cost model."""
    s2 = spectrum.double() ** 2
    total = float(s2.sum()) if normalize else 1.0
    k = r.align  # with ``align`` a candidate is the next k directions together
    params = cost_of(r).params
    out = []
    for j in range(k, max_saving_rank(r), k):
        cost = params(r, j + k) - params(r, j)
        out.append((float(s2[j:j + k].sum()) / (total or 1.0) / cost, r.name, cost))
    return out


def _take(candidates, ranks, step, used: int, budget: float) -> int:
    """Walk candidates by value; add a direction wherever it still fits (each matrix's are in order)."""
    for _, name, cost in candidates:
        if used + cost <= budget:
            ranks[name] += step[name]
            used += cost
    return used


def loss(stage, rows, spectra, options) -> None:
    if rows and rows[0].compensation:
        return residual_loss(stage, rows, spectra)  # EoRA: ranks of residual paths
    opts = LossOptions.model_validate(options)
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(module_type(r.name), []).append(r)
    step = {r.name: r.align for r in rows}
    ranks = {r.name: r.align for r in rows}  # every factorised matrix keeps at least one (aligned) step
    if opts.mode == "ratio":
        for members in groups.values():
            ranks.update(_ratio_ranks(stage, members, spectra, opts.normalize))
    leftovers, used = [], 0
    for members in groups.values():
        budget = stage.param_ratio * sum(r.params_before for r in members)
        cands = sorted((c for r in members for c in _candidates(r, spectra[r.name], opts.normalize)),
                       key=lambda c: -c[0])
        if opts.mode == "ratio":  # the smooth allocation is the start; the greedy only fills what it leaves
            used += sum(params_at(r, ranks[r.name]) for r in members)
        else:
            base = sum(params_at(r, r.align) for r in members)
            used += _take(cands, ranks, step, base, budget)
        leftovers += _remaining(cands, ranks, members)
    # the groups' rounding leaves less than one direction each: spend it on the best remaining ones overall
    _take(sorted(leftovers, key=lambda c: -c[0]), ranks, step, used,
          stage.param_ratio * sum(r.params_before for r in rows))
    for r in rows:
        set_rank(r, ranks[r.name], f"loss-allocated ({module_type(r.name)})")


def _remaining(cands, ranks, members) -> list:
    seen = {r.name: r.align for r in members}
    out = []
    for c in cands:
        seen[c[1]] += next(r.align for r in members if r.name == c[1])
        if seen[c[1]] > ranks[c[1]]:
            out.append(c)
    return out


def _ratio_ranks(stage, members, spectra, normalize: bool) -> dict[str, int]:
    """SVD-LLM V2's reallocation, made exact: at the uniform ratio each matrix would lose ``L_i`` (its truncation
    loss); it is given a removal fraction proportional to ``log(1/L_i)`` (relative loss, so a matrix that loses
    more is compressed less, with the log damping the spread), scaled by bisection so the group fits its budget."""
    budget = stage.param_ratio * sum(r.params_before for r in members)
    weight = {}
    for r in members:
        s2 = spectra[r.name].double() ** 2
        k = cost_of(r).knob_for(r, stage.param_ratio)
        loss = float(s2[k:].sum() / s2.sum()) if float(s2.sum()) > 0 else 1.0
        weight[r.name] = -math.log(min(max(loss, 1e-12), 1 - 1e-12)) if normalize else 1 / math.log(2 + float(s2[k:].sum()))

    mean_w = sum(weight.values()) / len(weight)

    def ranks_for(c: float) -> dict[str, int]:
        out = {}
        for r in members:
            removal = min(0.95, c * (1 - stage.param_ratio) * weight[r.name] / mean_w)
            out[r.name] = max(r.align, min(cost_of(r).knob_for(r, 1 - removal), max_saving_rank(r)))
        return out

    def total(c: float) -> float:
        return sum(params_at(r, k) for r, k in zip(members, ranks_for(c).values()))

    c = bisect(total, 0.0, 20.0, budget, increasing=False)
    return ranks_for(c)


register_allocator("loss", loss, reads="method", options=LossOptions, unit_kinds=("linear", "residual"),
                   description="SVD-LLM V2 (Wang et al., arXiv 2503.12340): per module type, ranks redistributed by "
                               "whitened truncation loss")
