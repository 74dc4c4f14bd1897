"""The block loop's path for methods that act on groups of modules (``Method.unit == "block"``, e.g. MoDeGPT).

Per block and stage: find the block's roles (``compress/roles.py``) and check them against its data flow; order the
units by the position of their modules in the block's call order (attention before the MLP in a pre-norm decoder);
then, phase by phase (the units living in one parent module form a phase: q/k and v/o in the attention, the MLP),
collect the statistics the method declares for the phase's units in one pass that stops after the last module it
needs, and let the method rebuild the modules. With ``engine.sequential`` each phase sees the earlier phases'
compressed modules (MoDeGPT's down_proj Gram after the attention is rebuilt); without it one pass over the block as
it came collects everything first.
"""
from __future__ import annotations

from ..plan_units import unit_report
from ..roles import block_roles, check_roles
from .stats import COLLECTORS


def _phases(rows, att, mlp, order: dict[str, int]) -> list[tuple[str, list]]:
    """``[(parent, rows)]`` in call order: ``"attention"`` (qk, vo rows) and ``"mlp"``."""
    phases = []
    att_rows = [r for r in rows if r.kind in ("qk", "vo")]
    if att_rows:
        phases.append(("attention", att_rows, order.get(att.q, 0)))
    mlp_rows = [r for r in rows if r.kind == "mlp"]
    if mlp_rows:
        phases.append(("mlp", mlp_rows, order.get(mlp.gate, 0)))
    return [(p, rs) for p, rs, _ in sorted(phases, key=lambda t: t[2])]


def compress_units(block, prefix: str, rows: list, method, config, groups, stream, index, eng, device, outs,
                   written: set, progress, run_pass) -> tuple[dict, list]:
    """Compress ``rows`` (this block's UnitRows of one stage) in place; return (module specs, report rows)."""
    kinds = {r.kind for r in rows}
    where = prefix.rstrip(".")
    att, mlp = block_roles(block, config, kinds, where)
    check_roles(groups, att, mlp, where)
    order = {n: i for i, n in enumerate(n for g in groups for n in g)}
    phases = _phases(rows, att, mlp, order)
    if not eng.sequential:  # every statistic from the block as it came, in one pass
        phases = [("all", [r for _, rs in phases for r in rs])]
    specs, report = {}, []
    for parent, prow in phases:
        needs: dict[str, set[str]] = {}
        for r in prow:
            for coll, members in method.statistics(r).items():
                needs.setdefault(coll, set()).update(n.removeprefix(prefix) for _, n in members)
        progress.phase(f"statistics {parent}")
        modules = dict(block.named_modules())
        collectors = [COLLECTORS[c](modules, {n: n for n in names}) for c, names in sorted(needs.items())]
        stop = max((n for names in needs.values() for n in names), key=lambda n: order.get(n, -1))
        record = eng.propagate == "original" and stream.name not in written
        try:
            run_pass(block, stream.x_in, stream.dev_kwargs[index], eng.batch_size, device,
                     out=outs[stream.name] if record else None, stop=None if record else stop)
        finally:
            for c in collectors:
                c.remove()
        if record:
            written.add(stream.name)
        stats = {c.name: {prefix + k: v for k, v in c.acc.items()} for c in collectors}
        progress.phase(f"rebuild {parent}")
        att_rows = {r.kind: r for r in prow if r.kind in ("qk", "vo")}
        if att_rows and any(r.factorize for r in att_rows.values()):
            s, infos = method.apply_attention(block, prefix, att, att_rows, stats)
            specs.update(s)
            report += infos
        for r in att_rows.values():
            if not r.factorize:
                report.append(_kept(r))
        for r in (r for r in prow if r.kind == "mlp"):
            if r.factorize:
                s, info = method.apply_mlp(block, prefix, r, stats)
                specs.update(s)
                report.append(info)
            else:
                report.append(_kept(r))
    return specs, report


def _kept(row) -> dict:
    """Report row of a unit whose allocation keeps every dim (left as it is)."""
    return unit_report(row, 0.0, 0.0, "all dims kept", kept_dim=row.dim)
