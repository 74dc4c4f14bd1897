"""Global budgets for compensation stages (EoRA residual paths): the ``energy`` and ``loss`` allocators there.

The spectra are those of each module's whitened residual ``ΔW Q Λ^{1/2}`` on the compressed model's inputs (so
``Σ_{i>r} σ_i²`` is exactly the error ``||(ΔW − B A) X||²`` left at rank r, EoRA Sec. 3) and the budget is the EXTRA
parameters ``param_ratio · Σ m·n``, the same total as the uniform allocator's ``floor(ρ·m·n/(m+n))`` per module.
Every module gets at least rank 1.

- ``loss``: the greedy minimiser of the summed error ``Σ_modules ||(ΔW − B A) X||²`` — rank by rank, the direction
  with the largest ``σ²`` per parameter ``m + n`` it costs (σ is descending per module, so greedy is optimal up to the
  last step). Measured best on the RTN fixture (docs/benchmarks.md).
- ``energy``: every module repairs the same fraction e of its own residual energy, e solved by bisection.
"""
from __future__ import annotations

import heapq

from ..linalg import rank_for_energy
from .budget import bisect
from .cost import cost_of


def _budget(stage, rows) -> int:
    return int(stage.param_ratio * sum(r.out_features * r.in_features for r in rows))


def _cost(r):
    return cost_of(r, "residual")


def _set(r, rank: int, note: str) -> None:
    r.rank, r.factorize = _cost(r).align(r, rank), True
    r.note = f"residual rank {r.rank} ({note})"


def residual_loss(stage, rows, spectra) -> None:
    budget = _budget(stage, rows)
    step = [r.align for r in rows]  # ranks move in multiples of the stage's align
    models = [_cost(r) for r in rows]
    rank = [c.align(r, 1) for r, c in zip(rows, models)]
    used = sum(c.extra(r, k) for r, c, k in zip(rows, models, rank))
    s2 = [spectra[r.name].double().square() for r in rows]

    def cost(i: int) -> int:  # extra parameters of the next ``step`` directions
        return models[i].extra(rows[i], rank[i] + step[i]) - models[i].extra(rows[i], rank[i])

    def value(i: int) -> float:  # error removed by the next ``step`` directions, per parameter
        return float(s2[i][rank[i]:rank[i] + step[i]].sum()) / cost(i)

    limit = [min(s2[i].numel(), rows[i].out_features, rows[i].in_features) for i in range(len(rows))]
    heap = [(-value(i), i) for i in range(len(rows)) if rank[i] + step[i] <= limit[i]]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        c = cost(i)
        if used + c > budget:
            continue  # this module's next directions do not fit; cheaper ones may
        used += c
        rank[i] += step[i]
        if rank[i] + step[i] <= limit[i]:
            heapq.heappush(heap, (-value(i), i))
    for r, k in zip(rows, rank):
        _set(r, k, "greedy on the summed whitened error")


def residual_energy(stage, rows, spectra) -> None:
    def rank(r, e: float) -> int:
        return _cost(r).align(r, rank_for_energy(spectra[r.name], e))

    e = bisect(lambda e: sum(_cost(r).extra(r, rank(r, e)) for r in rows), 0.0, 1.0,
               _budget(stage, rows), increasing=True)
    for r in rows:
        _set(r, rank(r, e), f"energy {e:.4f} of the residual repaired")
