"""What was done, in numbers: parameter accounting, per-module rows, timings; JSON, CSV and a rich table."""
from __future__ import annotations

import csv
import json
import resource
from pathlib import Path

from rich.table import Table

from .progress import measured_errors

CSV_FIELDS = ["name", "stage", "method", "type", "out_features", "in_features", "rank", "params_before",
              "params_after", "rel_error", "seconds", "note"]
# columns written only when some row has the field (so other runs' CSV stays as it was), each after the column named
OPTIONAL_CSV_FIELDS = {"dropped_score_share": "rel_error"}  # MoDeGPT's q/k units: their rel_error is not measured

RATIO_DEFINITION = ("kept_fraction_of_targeted = parameters of the targeted decoder-block Linears after / before "
                    "(weights + biases); embeddings and lm_head are never targeted and are excluded from it")


def unique_parameters(model) -> list:
    """Parameters counted once even when tied (embeddings shared with lm_head)."""
    return list({id(p): p for p in model.parameters()}.values())


def count_params(model) -> dict:
    """Unique parameters of the whole model, and how many of them are embeddings / output head."""
    total = sum(p.numel() for p in unique_parameters(model))
    emb = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
           for p in m.parameters()}
    n_emb = sum(p.numel() for p in emb.values())
    return {"total": total, "embeddings_and_head": n_emb, "excluding_embeddings_and_head": total - n_emb}


def _status_gib(field: str) -> float | None:
    """A memory field of Linux's ``/proc/self/status`` in GiB (None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def peak_rss_gib() -> float:
    """This process's peak resident memory since it started its program: Linux's ``VmHWM``. (``ru_maxrss`` also
    counts the memory of the parent it was forked from, e.g. a large Python process that ran ``lrc``.)"""
    peak = _status_gib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gib() -> float:
    """This process's resident memory now (``VmRSS``; 0 where the system does not say)."""
    return _status_gib("VmRSS") or 0.0


def build_report(rows: list[dict], before: dict, after: dict, extra: dict, bytes_per_param: float = 2) -> dict:
    pb = sum(r["params_before"] for r in rows)
    pa = sum(r["params_after"] for r in rows)
    targeted = {"modules": len({r["name"] for r in rows}),
                "factorized": sum(r["type"] == "lowrank" for r in rows),
                "kept_dense": sum(r["type"] == "dense" for r in rows),
                "compensated": sum(r["type"] == "compensated" for r in rows), "params_before": pb,
                "params_after": pa, "kept_fraction_of_targeted": pa / pb if pb else None}
    structured = [r for r in rows if r["type"] == "structured"]
    if structured:  # units of modules (MoDeGPT): how many, and the kept share of each block
        targeted["structured_units"] = len(structured)
    if any(r["type"] == "dictionary" for r in rows):  # CoSpaDi: parameters and bytes differ (the support mask)
        targeted["dictionary"] = sum(r["type"] == "dictionary" for r in rows)
        targeted.update(storage_totals(rows, bytes_per_param))
    report = {
        **extra,
        "ratio_definition": RATIO_DEFINITION,
        "targeted": targeted,
        "model_params": {"before": before, "after": after,
                         "kept_fraction_of_model": after["total"] / before["total"]},
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "modules": rows,
    }
    if structured:
        report["blocks"] = block_fractions(structured)
    return report


STORAGE_DEFINITION = ("kept_storage_fraction = bytes the targeted modules write (values in the checkpoint's dtype, "
                      "plus each dictionary module's support bitmask) / bytes of the dense matrices")


def storage_totals(rows: list[dict], bytes_per_param: float) -> dict:
    """Bytes before/after over the targeted modules: a row's own ``storage_bytes`` where it has one (a
    ``DictLinear``'s values, mask, dictionary and bias as written), else its parameters at ``bytes_per_param``."""
    before = sum(int(r["params_before"] * bytes_per_param) for r in rows)
    after = sum(r.get("storage_bytes", int(r["params_after"] * bytes_per_param)) for r in rows)
    return {"storage_bytes_before": before, "storage_bytes_after": after,
            "kept_storage_fraction": after / before if before else None, "storage_definition": STORAGE_DEFINITION}


def block_fractions(rows: list[dict]) -> list[dict]:
    """Per block: the structured units' parameters before/after, the kept fraction, and the allocator's target."""
    out: dict[int, dict] = {}
    for r in rows:
        b = out.setdefault(r["block"], {"block": r["block"], "params_before": 0, "params_after": 0,
                                        "kept_fraction_target": r.get("kept_fraction_target")})
        b["params_before"] += r["params_before"]
        b["params_after"] += r["params_after"]
    for b in out.values():
        b["kept_fraction"] = b["params_after"] / b["params_before"] if b["params_before"] else None
    return [out[k] for k in sorted(out)]


def csv_fields(rows: list[dict]) -> list[str]:
    """``CSV_FIELDS``, plus each optional field some row has (after its anchor column)."""
    fields = list(CSV_FIELDS)
    for name, after in OPTIONAL_CSV_FIELDS.items():
        if any(name in r for r in rows):
            fields.insert(fields.index(after) + 1, name)
    return fields


def write_report(directory: Path, report: dict) -> None:
    (directory / "lrc_report.json").write_text(json.dumps(report, indent=2))
    with open(directory / "lrc_modules.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_fields(report["modules"]), extrasaction="ignore")
        w.writeheader()
        w.writerows(report["modules"])


def summary_table(report: dict) -> Table:
    t = report["targeted"]
    mp = report["model_params"]
    table = Table(title="lrc compression summary", show_header=False)
    comp = f", {t['compensated']} compensated" if t.get("compensated") else ""
    if t.get("structured_units"):
        table.add_row("targeted units", f"{t['structured_units']} structured (groups of Linears rebuilt smaller)")
    elif not t.get("dictionary"):
        table.add_row("targeted Linears", f"{t['modules']} ({t['factorized']} factorized, {t['kept_dense']} kept "
                                          f"dense{comp})")
    if t.get("dictionary"):
        table.add_row("targeted Linears", f"{t['modules']} ({t['dictionary']} dictionary + sparse coefficients, "
                                          f"{t['kept_dense']} kept dense)")
    table.add_row("targeted params", f"{t['params_before']:,} → {t['params_after']:,} "
                                     f"(kept {t['kept_fraction_of_targeted']:.4f})")
    if t.get("storage_bytes_after") is not None:
        table.add_row("targeted storage", f"{t['storage_bytes_before']:,} → {t['storage_bytes_after']:,} bytes "
                                          f"(kept {t['kept_storage_fraction']:.4f}; values + support masks)")
    table.add_row("model params (all)", f"{mp['before']['total']:,} → {mp['after']['total']:,} "
                                        f"(kept {mp['kept_fraction_of_model']:.4f}, embeddings+head included)")
    errs = measured_errors(report["modules"], ("lowrank", "structured"))
    blocks = report.get("blocks")
    if blocks:
        fr = [b["kept_fraction"] for b in blocks]
        table.add_row("kept per block", f"min {min(fr):.3f}, max {max(fr):.3f} (" +
                      " ".join(f"{f:.2f}" for f in fr) + ")")
    if errs:
        table.add_row("weighted rel. error", f"mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}")
    ft = report.get("finetune")
    if ft:
        held = (f", held-out loss {ft['held_out_loss_before']:.4f} → {ft['held_out_loss_after']:.4f}"
                if ft.get("held_out_loss_before") is not None else "")
        table.add_row("fine-tuned", f"{ft['steps']} steps on {ft['config']['data']} ({ft['config']['loss']} loss, "
                                    f"train {ft['config']['train']}){held}, {ft['seconds']:.0f} s")
    ph = report.get("phase_seconds", {})
    detail = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in ph.items())
    total = report.get("total_seconds")
    after = f"; {total:.1f} s in all, with the work after the blocks" if total and total > report.get(
        "seconds", 0) + 5 else ""
    table.add_row("wall time", f"{report.get('seconds', 0):.1f} s on {report.get('device', '?')}"
                  + (f" ({detail})" if detail else "") + after)
    table.add_row("peak RSS", f"{report['peak_rss_gib']:.2f} GiB")
    return table
