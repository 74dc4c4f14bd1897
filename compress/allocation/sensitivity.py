"""``sensitivity`` allocator: ASVD's sensitivity-based truncation rank search, STRS (Yuan et al., arXiv 2312.05821,
Sec. 3.4; methods.md §3a).

For every targeted matrix and every candidate kept ratio, only that matrix is replaced by the method's rank-r
approximation and the calibration perplexity of the whole model is measured (``sweep``; the expensive part: one
forward over ``samples`` calibration windows per pair, cached on disk under ``$LRC_CACHE/sensitivity``). Then, as in
ASVD: all (matrix, ratio, ppl) triples are sorted by ppl, descending; a cut index is binary-searched; each matrix gets
the smallest ratio that appears after the cut (1 = left dense), the smallest cut whose total fits the budget wins.
lrc then spends what the discrete ratios leave of the budget on single ranks, most sensitive matrices first, so the
result is within one rank step of ``param_ratio``.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..linalg import rank_for_ratio
from .budget import budget_params, params_at, set_rank
from .registry import register_allocator


class SensitivityOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratios: list[float] = Field([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                                description="candidate kept ratios per matrix (ASVD's param-ratio grid)")
    samples: int = Field(4, gt=0, description="calibration windows per perplexity measurement")


def rank_at(r, ratio: float, align: int) -> int:
    return max(1, rank_for_ratio(r.out_features, r.in_features, ratio, align))


def sensitivity(stage, rows, table, options) -> None:
    """``table[name]`` = calibration ppl at each of ``options['ratios']`` (the sweep's result)."""
    opts = SensitivityOptions.model_validate(options)
    ratios = sorted(opts.ratios)
    budget = budget_params(rows, stage.param_ratio)
    triples = sorted(((float(table[r.name][k]), r.name, ratios[k]) for r in rows for k in range(len(ratios))),
                     key=lambda t: -t[0])
    by_name = {r.name: r for r in rows}

    def choice(cut: int) -> dict[str, float]:
        chosen = {r.name: 1.0 for r in rows}
        for _, name, ratio in triples[cut:]:
            chosen[name] = min(chosen[name], ratio)
        return chosen

    def total(chosen) -> int:
        return sum(params_at(by_name[n], rank_at(by_name[n], q, stage.align)) if q < 1 else by_name[n].params_before
                   for n, q in chosen.items())

    lo, hi = 0, len(triples)  # cut = len(triples): nothing compressed; cut = 0: every matrix at its lowest ratio
    if total(choice(0)) > budget:
        lo = hi = 0  # the grid cannot reach the budget: take the smallest ratios, noted below
    while lo < hi:  # the largest cut (fewest compressed pairs) whose total still fits the budget
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(choice(mid)) <= budget else (lo, mid - 1)
    chosen = choice(lo)
    ranks = {n: (rank_at(by_name[n], q, stage.align) if q < 1 else None) for n, q in chosen.items()}
    used = total(chosen)
    order = sorted(rows, key=lambda r: -float(table[r.name][0]))  # most sensitive (worst at lowest ratio) first
    grew = True
    while grew:  # top up with single ranks while the budget allows
        grew = False
        for r in order:
            if ranks[r.name] is None:
                continue
            cost = params_at(r, ranks[r.name] + r.align) - params_at(r, ranks[r.name])
            if used + cost <= budget and cost > 0 and params_at(r, ranks[r.name] + r.align) < r.params_before:
                ranks[r.name] += r.align
                used += cost
                grew = True
    for r in rows:
        if ranks[r.name] is None:
            r.rank, r.factorize, r.note = None, False, "sensitivity: kept dense"
        else:
            set_rank(r, ranks[r.name], f"sensitivity ratio {chosen[r.name]}")


register_allocator("sensitivity", sensitivity, reads="sweep", options=SensitivityOptions,
                   description="ASVD's STRS (Yuan et al., arXiv 2312.05821): ratios chosen from each matrix's "
                               "calibration perplexity at every candidate ratio")
