"""Turn one Linear + its statistics + its planned rank into a replacement module and a report row."""
from __future__ import annotations

import time

import torch
from torch import nn

from ..allocation import decide_from_spectrum
from ..checkpoint.modeling_lrc import LowRankLinear
from ..checkpoint.module_types import effective_weight, module_spec
from ..linalg import dense_objective_error, dense_target, weighted_error
from ..report_row import report_row
from .memory import release

lowrank_spec = module_spec  # the config entry describing a replacement module (``checkpoint/module_types.py``)


def untouched(row, why: str, kept: str = "dense") -> dict:
    """The report row of a module left as it is (no statistics to decompose it from): its parameters unchanged,
    ``why`` in the note, so the run's accounting and the reader both see it. ``kept``: its report type (``unchanged``
    for a module a wrap method leaves, which an earlier stage may have compressed)."""
    return report_row(row, kept, 0.0, 0.0, why, params_after=row.params_before)


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
    if method.replacement == "build":  # a method that builds a module of its own type
        return _built(method, module, W, target, stats, row, dense, t0)
    spectrum = method.spectrum(target, stats)
    decide_from_spectrum(stage, row, spectrum.sigma)  # an energy budget: rank from this matrix's own spectrum
    H = stats.get("input_gram")
    new = None
    error = 0.0
    if row.factorize:
        A, B = spectrum.factors(row.rank)
        # exact ||(W - AB)X|| / ||WX||: free from the spectrum when it is the input-Gram-weighted one
        if dense:  # the documented error: ||W X − W' X̃|| / ||W X||, against the dense model's outputs
            error = dense_objective_error(W, A @ B, stats["dense_gram"], stats["cross_gram"], H)
        else:
            error = spectrum.relative_error(row.rank) if spectrum.input_weighted else weighted_error(W, A @ B, H)
        new = LowRankLinear(row.in_features, row.out_features, row.rank, bias=module.bias is not None,
                            device=module.weight.device, dtype=module.weight.dtype)
        new.first.weight.copy_(B)
        new.second.weight.copy_(A)
        if module.bias is not None:
            new.second.bias.copy_(module.bias)
    return new, report_row(row, "lowrank" if new is not None else "dense", error, time.perf_counter() - t0,
                           rank=row.rank if new else None)


def _built(method, module, W, target, stats, row, dense: bool, t0: float) -> tuple[nn.Module | None, dict]:
    """``decompose`` for a method with ``build(target, bias, stats, row, dtype) -> (module, fields)``: the module,
    its error as ``decompose`` reports it, and the method's fields (rounds, phase times...) in the report row."""
    new, fields = None, {}
    error = 0.0
    if row.factorize:
        bias = None if module.bias is None else module.bias.detach()
        new, fields = method.build(target, bias, stats, row, module.weight.dtype)
        new = new.to(module.weight.device)
        approx = effective_weight(new)
        H = stats["input_gram"]
        error = dense_objective_error(W, approx, stats["dense_gram"], stats["cross_gram"], H) if dense else \
            weighted_error(W, approx, H)
    return new, built_row(row, new, error, fields, time.perf_counter() - t0)


def built_row(row, new: nn.Module | None, error: float, fields: dict, seconds: float) -> dict:
    """The report row of a module a method built (``type``: its module type's, ``checkpoint/module_types.py``;
    ``dense`` when none was): the plan row's accounting, the error, the module's ``storage_bytes`` and the method's
    ``fields`` (its ``note`` joins the row's)."""
    fields = dict(fields)
    note = fields.pop("note", "")
    fields.pop("seconds", None)  # the row's time is the whole build's
    storage = {"storage_bytes": new.storage_bytes()} if new is not None and hasattr(new, "storage_bytes") else {}
    return report_row(row, module_spec(new)["type"] if new is not None else "dense", error, seconds, note,
                      rank=row.rank if new else None, **storage, **fields)


def replace_group(job, group: list[str], rel: dict, collectors: list, method, stage, get, put) -> None:
    """Decompose (or wrap) every module of ``group`` (``rel``: name in the block -> plan row) from the statistics
    ``collectors`` gathered, and install each replacement with ``put(name, module)``; ``get(name)`` is the module there
    now. Report rows and module specs go to ``job`` (``engine/job.py``), which also holds the gradient statistics, the
    original weights a wrap repairs towards and the run's shared groups: a module of a shared group
    (``Method.shared_group``) is stashed until its group is complete (``shared.py``)."""
    eng, originals, extra, shared, specs, report = job.eng, job.originals, job.extra, job.shared, job.specs, job.report
    wraps = method.replacement == "wrap"  # the new module keeps the old one as its base
    gram = next(c for c in collectors if c.name == "input_gram")
    for n in group:
        if not gram.tokens(n):  # e.g. an expert the router never chose: nothing to decompose it from
            report.append(untouched(rel[n], "received no calibration token (an expert never routed to?); left as is",
                                    "unchanged" if wraps else "dense"))
            continue
        stats = {c.name: c.result(n) for c in collectors}
        stats.update((extra or {}).get(rel[n].name, {}))
        if shared is not None and method.shared_group(rel[n]) is not None:  # fitted with its group's last block
            shared.stash(rel[n], get(n), stats["input_gram"])
            continue
        if wraps:
            new, info = method.wrap(get(n), originals[n], stats, rel[n])
        else:
            new, info = decompose(method, get(n), stats, rel[n], stage, eng.dense_damping)
        report.append(info)
        if new is not None:
            old = get(n)
            put(n, new)
            if not wraps:
                release([p.data for p in old.parameters()])
            specs[rel[n].name] = lowrank_spec(new)
