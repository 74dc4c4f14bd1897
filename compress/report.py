"""What was done, in numbers: parameter accounting, per-module rows, timings; JSON, CSV and a rich table."""
from __future__ import annotations

import csv
import json
import resource
from pathlib import Path

from rich.table import Table

from .checkpoint.module_types import report_types
from .progress import error_types, measured_errors

CSV_FIELDS = ["name", "stage", "method", "type", "out_features", "in_features", "rank", "params_before",
              "params_after", "rel_error", "seconds", "note"]

RATIO_DEFINITION = ("kept_fraction_of_targeted = parameters of the targeted decoder-block Linears after / before "
                    "(weights + biases); embeddings and lm_head are never targeted and are excluded from it")


def unique_parameters(model) -> list:
    """Parameters counted once even when tied (embeddings shared with lm_head)."""
    return list({id(p): p for p in model.parameters()}.values())


def count_params(model) -> dict:
    """Unique parameters of the whole model, and how many of them are embeddings / output head."""
    from .checkpoint.module_types import stored_weights

    total = sum(p.numel() for p in unique_parameters(model)) + stored_weights(model)  # quantized weights too
    heads = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    emb = {id(p): p for m in heads for p in m.parameters()}
    n_emb = sum(p.numel() for p in emb.values()) + sum(stored_weights(m) for m in heads)  # tied quantized head: 0
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
    """The report: ``targeted`` counts the rows of each report row type (``ReportType.count``: the ones every report
    has, then the others that occur), and adds storage totals when rows carry their own ``storage_bytes`` (a module
    that writes other than its parameters: a dictionary's support mask); unit rows get per-block fractions."""
    pb = sum(r["params_before"] for r in rows)
    pa = sum(r["params_after"] for r in rows)
    types = report_types()
    counts = {t.count: sum(r["type"] == t.word for r in rows) for t in types}
    targeted = {"modules": len({r["name"] for r in rows}), **{t.count: counts[t.count] for t in types if t.always},
                "params_before": pb, "params_after": pa, "kept_fraction_of_targeted": pa / pb if pb else None}
    targeted.update((t.count, counts[t.count]) for t in types if not t.always and counts[t.count])
    if any("storage_bytes" in r for r in rows):  # parameters and bytes differ
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
    units = {t.word for t in types if t.units}
    unit_rows = [r for r in rows if r["type"] in units]
    if unit_rows:  # units of modules: the kept share of each block
        report["blocks"] = block_fractions(unit_rows)
    return report


STORAGE_DEFINITION = ("kept_storage_fraction = bytes the targeted modules write (values in the checkpoint's dtype, "
                      "plus each dictionary module's support bitmask) / bytes of the dense matrices")


def storage_totals(rows: list[dict], bytes_per_param: float) -> dict:
    """Bytes before/after over the targeted modules: a row's own ``storage_bytes`` where it has one (the tensors its
    module writes, e.g. a dictionary module's values, mask, dictionary and bias), else its parameters at
    ``bytes_per_param``."""
    before = sum(int(r["params_before"] * bytes_per_param) for r in rows)
    after = sum(r.get("storage_bytes", int(r["params_after"] * bytes_per_param)) for r in rows)
    return {"storage_bytes_before": before, "storage_bytes_after": after,
            "kept_storage_fraction": after / before if before else None, "storage_definition": STORAGE_DEFINITION}


def block_fractions(rows: list[dict]) -> list[dict]:
    """Per block: the units' parameters before/after, the kept fraction, and the allocator's target."""
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
    """``CSV_FIELDS``, plus each optional column of a report row type (``ReportType.columns``) that some row has,
    after its anchor column: written only then, so other runs' CSV stays as it was."""
    fields = list(CSV_FIELDS)
    for name, after in (column for t in report_types() for column in t.columns):
        if name not in fields and any(name in r for r in rows):
            fields.insert(fields.index(after) + 1, name)
    return fields


def write_report(directory: Path, report: dict) -> None:
    (directory / "lrc_report.json").write_text(json.dumps(report, indent=2))
    with open(directory / "lrc_modules.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_fields(report["modules"]), extrasaction="ignore")
        w.writeheader()
        w.writerows(report["modules"])


def checkpoint_bytes(directory) -> dict:
    """Bytes of the tensors a written checkpoint holds (every ``*.safetensors`` file's data, read from the headers):
    ``tensors`` in all, ``embeddings_and_head`` (names with ``embed`` or ``lm_head``; a tied head is stored once),
    ``quantized`` (a ``QuantLinear``'s codes, scales, zero points and bias), and ``files`` (on disk, headers included)."""
    import json
    import struct
    from pathlib import Path

    out = {"tensors": 0, "embeddings_and_head": 0, "quantized": 0, "files": 0}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out["files"] += f.stat().st_size
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        quant = {k.rsplit(".", 1)[0] for k in header if k.endswith(".qweight")}
        for k, v in header.items():
            if k == "__metadata__":
                continue
            n = v["data_offsets"][1] - v["data_offsets"][0]
            out["tensors"] += n
            if "embed" in k or "lm_head" in k:
                out["embeddings_and_head"] += n
            if k.rsplit(".", 1)[0] in quant:
                out["quantized"] += n
    return out


def _compensation(qz: dict) -> str:
    """The ``quantized`` line's tail with ``quantize.compensate``: the residuals' rank and bytes (in the bytes
    after) and the mean error before them."""
    rows = [r for r in qz.get("rows", []) if "residual_bytes" in r]
    if not rows:
        return ""
    comp = qz["settings"]["compensate"]
    width = f", int{comp['bits']}" if comp.get("bits", 16) < 16 else ""
    return (f", with {comp['method']} residuals of rank {comp['rank']} ({sum(r['residual_bytes'] for r in rows):,} "
            f"bytes{width}; error "
            f"{sum(r['quant_error'] for r in rows) / len(rows):.4f} before them)")


def summary_table(report: dict) -> Table:
    t = report["targeted"]
    mp = report["model_params"]
    table = Table(title="lrc compression summary", show_header=False)
    types = report_types()
    for units, label in ((True, "targeted units"), (False, "targeted Linears")):
        parts = [f"{t[rt.count]} {rt.phrase}" for rt in types if rt.units == units and t.get(rt.count)]
        if not parts:
            continue
        words = {rt.word for rt in types if rt.units == units}
        names = len({r["name"] for r in report["modules"] if r["type"] in words})
        table.add_row(label, ", ".join(parts) if units else f"{names} ({', '.join(parts)})")
    if t.get("params_before"):  # a recipe with stages (quantization alone has none)
        table.add_row("targeted params", f"{t['params_before']:,} → {t['params_after']:,} "
                                         f"(kept {t['kept_fraction_of_targeted']:.4f})")
    if t.get("storage_bytes_after") is not None:
        table.add_row("targeted storage", f"{t['storage_bytes_before']:,} → {t['storage_bytes_after']:,} bytes "
                                          f"(kept {t['kept_storage_fraction']:.4f}; values + support masks)")
    table.add_row("model params (all)", f"{mp['before']['total']:,} → {mp['after']['total']:,} "
                                        f"(kept {mp['kept_fraction_of_model']:.4f}, embeddings+head included)")
    errs = measured_errors(report["modules"], error_types(summary=True))
    blocks = report.get("blocks")
    if blocks:
        fr = [b["kept_fraction"] for b in blocks]
        table.add_row("kept per block", f"min {min(fr):.3f}, max {max(fr):.3f} (" +
                      " ".join(f"{f:.2f}" for f in fr) + ")")
    if errs:
        table.add_row("weighted rel. error", f"mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}")
    rf = report.get("refine")
    if rf:
        table.add_row("refined blocks", f"{rf['kept']}/{rf['of']} improved, block MSE to the dense outputs "
                                        f"{rf['mean_mse_before']:.4g} → {rf['mean_mse_after']:.4g} (mean), "
                                        f"{rf['seconds']:.0f} s")
    qz = report.get("quantization")
    if qz:
        st = qz["settings"]
        table.add_row("quantized", f"{qz['matrices']} matrices, {st['method']} int{st['bits']}"
                                   f"{'/g' + str(st['group_size']) if st['group_size'] else ''}: "
                                   f"{qz['bytes_before']:,} → {qz['bytes_after']:,} bytes "
                                   f"(kept {qz['kept_bytes_fraction']:.4f}), weighted rel. error mean "
                                   f"{qz['mean_rel_error']:.4f}" + _compensation(qz))
    cb = report.get("checkpoint_bytes")
    if cb:
        table.add_row("checkpoint tensors", f"{cb['tensors']:,} bytes ({cb['embeddings_and_head']:,} embeddings "
                                            f"and head, {cb['quantized']:,} quantized)")
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
