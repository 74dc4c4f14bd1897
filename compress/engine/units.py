"""The block loop's path for block methods (``Method.unit == "block"``): the method rebuilds groups of a block's
modules (units) itself, through the hooks of ``methods/base.py``; this path names no method and no unit kind.

Per block and stage: the method finds the block's roles and checks them against the block's data flow (``groups``:
the Linears grouped by the input they read, in call order); it groups the units into phases, one per parent module
they live in, which run in the block's call order. Per phase: collect the statistics the method declares for the
phase's units in one pass that stops after the last module it needs, then let the method rebuild the phase's
modules. With ``engine.sequential`` each phase sees the earlier phases' rebuilt modules (e.g. a later parent's Gram
after an earlier one is rebuilt); without it one pass over the block as it came collects everything first.
"""
from __future__ import annotations

from .job import BlockJob
from .passes import run_pass
from .stats import COLLECTORS


def compress_units(job: BlockJob, rows: list, method, groups: list[list[str]], stream) -> None:
    """Compress ``rows`` (this block's units of one stage, calibrated on ``stream``) in place; their specs and report
    rows go to ``job``. ``groups``: the block's Linears grouped by the input they read, in call order."""
    block, prefix, eng, progress = job.block, job.prefix, job.eng, job.progress
    roles = method.roles(block, job.config, rows, prefix)
    method.check_roles(roles, groups)
    order = {n: i for i, n in enumerate(n for g in groups for n in g)}
    phases = sorted(method.phases(rows, roles), key=lambda p: order.get(p[1], 0))
    # the phases each statistics pass serves: one each, or all of them from the block as it came
    steps = [(name, [rs]) for name, _, rs in phases] if eng.sequential else [("all", [rs for _, _, rs in phases])]
    for label, parts in steps:
        needs: dict[str, set[str]] = {}
        for r in (r for rs in parts for r in rs):
            for coll, members in method.statistics(r).items():
                needs.setdefault(coll, set()).update(n.removeprefix(prefix) for _, n in members)
        progress.phase(f"statistics {label}")
        modules = dict(block.named_modules())
        collectors = [COLLECTORS[c](modules, {n: n for n in names}) for c, names in sorted(needs.items())]
        stop = max((n for names in needs.values() for n in names), key=lambda n: order.get(n, -1))
        record = eng.propagate == "original" and stream.name not in job.written
        try:
            run_pass(block, stream.x_in, stream.dev_kwargs[job.index], eng.batch_size, job.device,
                     out=job.outs[stream.name] if record else None, stop=None if record else stop)
        finally:
            for c in collectors:
                c.remove()
        if record:
            job.written.add(stream.name)
        stats = {c.name: {prefix + k: v for k, v in c.acc.items()} for c in collectors}
        progress.phase(f"rebuild {label}")
        for rs in parts:
            specs, infos = method.rebuild(block, roles, rs, stats)
            job.specs.update(specs)
            job.report += infos
