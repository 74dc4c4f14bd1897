"""Turn one Linear + its statistics + its planned rank into a replacement module and a report row."""
from __future__ import annotations

import time

import torch
from torch import nn

from ..allocation.uniform import decide
from ..checkpoint.modeling_lrc import LowRankLinear
from ..linalg import dense_objective_error, dense_target, rank_for_energy, weighted_error


def lowrank_spec(m: LowRankLinear) -> dict:
    return {"type": "lowrank", "in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
            "bias": m.second.bias is not None}


@torch.no_grad()
def decompose(method, module: nn.Linear, stats: dict, row, stage, dense_damping: float = 0.1
              ) -> tuple[nn.Module | None, dict]:
    """Replacement module (or None when the matrix stays dense) and the per-module report row.

    With ``cross_gram`` in ``stats`` (``objective: dense``), data-aware methods factorise the least-squares weight
    that maps the compressed inputs to the dense outputs (``linalg.dense_target``), and the reported error is
    ``||W X − W' X̃|| / ||W X||`` against the dense model's outputs.
    """
    t0 = time.perf_counter()
    W = module.weight.detach().double()
    dense = "cross_gram" in stats
    target = W
    if dense and "input_gram" in method.needs:
        target = dense_target(W, stats["input_gram"], stats["cross_gram"], dense_damping)
    spectrum = method.spectrum(target, stats)
    if row.rank is None and row.factorize is None:  # energy budget: rank from this matrix's own spectrum
        decide(row, rank_for_energy(spectrum.sigma, stage.energy))
    H = stats.get("input_gram")
    new = None
    error = 0.0
    if row.factorize:
        A, B = spectrum.factors(row.rank)
        # exact ||(W - AB)X|| / ||WX||: free from the spectrum when it is the input-Gram-weighted one
        error = spectrum.relative_error(row.rank) if spectrum.input_weighted else weighted_error(W, A @ B, H)
        new = LowRankLinear(row.in_features, row.out_features, row.rank, bias=module.bias is not None,
                            device=module.weight.device, dtype=module.weight.dtype)
        new.first.weight.copy_(B)
        new.second.weight.copy_(A)
        if module.bias is not None:
            new.second.bias.copy_(module.bias)
    info = {
        "name": row.name, "stage": row.stage, "method": row.method,
        "type": "lowrank" if new is not None else "dense",
        "out_features": row.out_features, "in_features": row.in_features, "rank": row.rank if new else None,
        "params_before": row.params_before, "params_after": row.params_after,
        "rel_error": error, "seconds": round(time.perf_counter() - t0, 4), "note": row.note,
    }
    return new, info
