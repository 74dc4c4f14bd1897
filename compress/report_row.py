"""The one builder of per-module report rows (``lrc_report.json`` ``modules``, ``lrc_modules.csv``): a plan row's
accounting (name, stage, method, shape, parameters before and after) and what the method measured. The engine's rows
(``engine/decompose.py``: low-rank, built, untouched) and every method's own (a wrap's, a block method's units) come
from here, so a column means one thing in every row."""
from __future__ import annotations

_UNSET = object()


def report_row(row, type: str, rel_error: float | None, seconds: float, note: str = "", rank: int | None = None,
               params_after=_UNSET, **fields) -> dict:
    """The report row of plan row ``row`` whose module is now of report type ``type``.

    ``rel_error``: ‖ΔY‖/‖Y‖ on the calibration inputs (None: not measured); ``note`` joins the plan row's note;
    ``params_after`` defaults to the plan's; ``fields`` are the method's own columns, before ``seconds`` and ``note``.
    A unit row (``row.linear`` False) has no shape or rank of its own."""
    shape = {"out_features": row.out_features, "in_features": row.in_features, "rank": rank}
    return {"name": row.name, "stage": row.stage, "method": row.method, "type": type, **shape,
            "params_before": row.params_before,
            "params_after": row.params_after if params_after is _UNSET else params_after,
            "rel_error": rel_error, **fields, "seconds": round(seconds, 4),
            "note": (f"{row.note}; " if row.note else "") + note if note else row.note}
