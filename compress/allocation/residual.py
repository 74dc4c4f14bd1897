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


def _budget(stage, rows) -> int:
    return int(stage.param_ratio * sum(r.out_features * r.in_features for r in rows))


def _set(r, rank: int, note: str) -> None:
    r.rank, r.factorize = max(1, min(rank, r.out_features, r.in_features)), True
    r.note = f"residual rank {r.rank} ({note})"


def residual_loss(stage, rows, spectra) -> None:
    budget = _budget(stage, rows)
    cost = [r.out_features + r.in_features for r in rows]
    rank = [1] * len(rows)
    used = sum(cost)
    s2 = [spectra[r.name].double().square() for r in rows]
    heap = [(-float(s2[i][1]) / cost[i], i) for i in range(len(rows)) if s2[i].numel() > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if used + cost[i] > budget:
            continue  # this module's next direction does not fit; cheaper ones may
        used += cost[i]
        rank[i] += 1
        if rank[i] < min(s2[i].numel(), rows[i].out_features, rows[i].in_features):
            heapq.heappush(heap, (-float(s2[i][rank[i]]) / cost[i], i))
    for r, k in zip(rows, rank):
        _set(r, k, "greedy on the summed whitened error")


def residual_energy(stage, rows, spectra) -> None:
    def rank(r, e: float) -> int:
        return max(1, min(rank_for_energy(spectra[r.name], e), r.out_features, r.in_features))

    e = bisect(lambda e: sum(rank(r, e) * (r.out_features + r.in_features) for r in rows), 0.0, 1.0,
               _budget(stage, rows), increasing=True)
    for r in rows:
        _set(r, rank(r, e), f"energy {e:.4f} of the residual repaired")
