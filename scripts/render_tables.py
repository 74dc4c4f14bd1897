"""Render the tables of docs/benchmarks.md from the raw results in docs/results/, and check that the document
shows exactly what the files hold.

Each table sits between ``<!-- NAME -->`` and ``<!-- /NAME -->`` markers and is produced by the ``markdown``
function of the script that measured it (so a number in the table can only come from a raw file):

    python scripts/render_tables.py            # print every table
    python scripts/render_tables.py --write    # replace the marked sections of docs/benchmarks.md
    python scripts/render_tables.py --check    # exit 1 (and show the section) where the document differs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = ROOT / "docs" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
sys.path.insert(0, str(HERE))

import bench_compress  # noqa: E402
import bench_cospadi  # noqa: E402
import bench_eora  # noqa: E402
import bench_finetune  # noqa: E402
import bench_floor  # noqa: E402
import bench_modegpt  # noqa: E402
import bench_quality  # noqa: E402
import bench_usable  # noqa: E402
import bench_bytes  # noqa: E402
import bench_scale  # noqa: E402
import bench_selfgen  # noqa: E402
import bench_speed  # noqa: E402
import bench_stories260k  # noqa: E402


def rows(name: str) -> list[dict]:
    path = RESULTS / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eora_ab(results: list[dict]) -> str:
    """EoRA after svd-llm at 0.6, each paired with plain svd-llm at (nearly) the same total parameter count."""
    by = {r["config"]: r for r in results}
    dense, base = by["dense"]["perplexity"], by["svd-llm@uniform:0.6"]
    lines = ["| EoRA configuration | kept | perplexity | gap closed | plain svd-llm at the same total | kept | "
             "perplexity |", "|---|---:|---:|---:|---|---:|---:|",
             f"| svd-llm@uniform:0.6 | {base['kept_measured']:.4f} | {base['perplexity']:.2f} | – | | | |"]
    for rank in (8, 16, 32):
        e = by[f"svd-llm@uniform:0.6>eora={rank}"]
        gap = (base["perplexity"] - e["perplexity"]) / (base["perplexity"] - dense)
        plain = by[f"svd-llm@uniform:{e['kept_measured']:.4f}"]
        lines.append(f"| svd-llm@uniform:0.6 + EoRA r{rank} | {e['kept_measured']:.4f} | {e['perplexity']:.2f} | "
                     f"{gap:.1%} | {plain['config']} | {plain['kept_measured']:.4f} | {plain['perplexity']:.2f} |")
    top = by["svd-llm@uniform:0.7"]
    lines.append(f"| | | | | {top['config']} | {top['kept_measured']:.4f} | {top['perplexity']:.2f} |")
    return "\n".join(lines)


def compress_rows() -> list[dict]:
    found = [p for p in (RESULTS / "compress-stories260k.jsonl", RESULTS / "compress-smollm2.jsonl") if p.is_file()]
    return [r for p in found for r in rows(p.name)]


# The peers' own code under the same protocol, as measured and published in ../shared/README.md ("Targets measured
# against the peers' own code"): perplexity, compress wall seconds, peak RSS GiB.
PEER_SVD_LLM = {("SmolLM2-135M", 0.8): (229.4, 84, 2.7), ("SmolLM2-135M", 0.6): (835.6, 84, 2.7),
                ("stories260k", 0.8): (148.7, 1.5, 0.4), ("stories260k", 0.6): (196.7, 1.5, 0.4)}
MODEL_SPECS = {"SmolLM2-135M": "smollm2", "stories260k": "stories260k"}
MODES = ["default", "paper protocol", "dense objective"]


def peers() -> str:
    """lrc's svd-llm in each engine mode beside the peer's SVD-LLM: perplexity / compress s / peak RSS."""
    found: dict[tuple, str] = {}
    for r in compress_rows():
        if r["method"] != "svd-llm":
            continue
        share = bench_compress.contention(r)
        secs = f"{r['compress_seconds']:.1f} s" + ("" if share is not None and share < bench_compress.CONTENDED else
                                                  " (contended?)" if share is None else f" (others {share:.0%})")
        key = (Path(r["model"]).name, r["kept"], bench_compress.engine_mode(r.get("engine", {})))
        found[key] = f"{r['wikitext2_ppl']:,.2f} / {secs} / {r['peak_rss_gib']:.2f} GiB"
    quality = {r["config"]: r for r in rows("quality-smollm2-32x256.jsonl")}  # same protocol, default engine
    lines = ["| model | kept | peer SVD-LLM ppl / s / RSS | lrc svd-llm default | lrc paper protocol | "
             "lrc dense objective |", "|---|---|---|---|---|---|"]
    for (model, kept), (ppl, secs, rss) in PEER_SVD_LLM.items():
        cells = []
        for mode in MODES:
            cell = found.get((MODEL_SPECS[model], kept, mode))
            q = quality.get(f"svd-llm@uniform:{kept}") if model == "SmolLM2-135M" and mode == "default" else None
            if cell is None and q is not None:
                cell = f"{q['perplexity']:,.2f} / {q['compress_seconds']:.1f} s / {q['peak_rss_gib']:.2f} GiB (q)"
            cells.append(cell or "not measured in this revision")
        lines.append(f"| {model} | {kept} | {ppl:,} / {secs} s / {rss} GiB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SECTIONS = {
    "compress": lambda: bench_compress.markdown(compress_rows()),
    "peers": peers,
    "table64": lambda: bench_quality.markdown(rows("quality-smollm2-64x512.jsonl")),
    "tablekfac": lambda: bench_quality.markdown(rows("kfac-smollm2-64x512.jsonl")),
    "table": lambda: bench_quality.markdown(rows("quality-smollm2-32x256.jsonl")),
    "allocators-stories260k": lambda: bench_stories260k.markdown(rows("allocators-stories260k.jsonl")),
    "eora-stories260k": lambda: bench_stories260k.eora_markdown(rows("eora-stories260k.jsonl")),
    "eora-ab": lambda: eora_ab(rows("quality-smollm2-32x256.jsonl")),
    "eora-rtn": lambda: bench_eora.gap_table(rows("eora-rtn-smollm2.jsonl")),
    "modegpt": lambda: bench_modegpt.markdown(rows("modegpt-smollm2.jsonl"), bench_modegpt.TASKS),
    "modegpt-ablations": lambda: bench_modegpt.markdown(rows("modegpt-smollm2-ablations.jsonl"), bench_modegpt.TASKS),
    "cospadi": lambda: bench_modegpt.markdown(rows("cospadi-smollm2.jsonl"), bench_modegpt.TASKS),
    "cospadi-curve": lambda: bench_cospadi.markdown_curve(rows("cospadi-curve.jsonl")),
    "cospadi-large": lambda: bench_cospadi.markdown_large(rows("cospadi-large.jsonl")),
    "floor": lambda: bench_floor.markdown(rows("floor-smollm2.jsonl")),
    "scale": lambda: bench_scale.markdown(rows("scale.jsonl")),
    "speed": lambda: bench_speed.markdown(rows("speed-smollm2.jsonl")),
    "selfgen": lambda: bench_selfgen.markdown(rows("selfgen-smollm2.jsonl")),
    "finetune": lambda: bench_finetune.markdown(rows("finetune-smollm2.jsonl")),
    "bytes": lambda: bench_bytes.markdown(rows("bytes-smollm2-64x512.jsonl"), bench_bytes.dense_perplexity(),
                                          bench_bytes.dense_answers(rows("bytes-smollm2-64x512.jsonl"))),
    "bytes-speed": lambda: bench_bytes.speed_markdown(rows("bytes-speed-smollm2.jsonl")),
    "usable": lambda: bench_usable.markdown(rows("usable-smollm2-64x512.jsonl"), bench_usable.dense_reference(
        rows("usable-smollm2-64x512.jsonl"), RESULTS / "smollm2-dense-eval.json")),
}


def replace(doc: str, name: str, table: str) -> str:
    start, end = f"<!-- {name} -->\n", f"<!-- /{name} -->"
    i, j = doc.index(start) + len(start), doc.index(end)
    return doc[:i] + table + "\n" + doc[j:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    a = ap.parse_args()
    doc = DOC.read_text()
    new = doc
    for name, render in SECTIONS.items():
        table = render()
        if not (a.write or a.check):
            print(f"<!-- {name} -->\n{table}\n<!-- /{name} -->\n")
        new = replace(new, name, table)
    if a.write and new != doc:
        DOC.write_text(new)
    if a.check and new != doc:
        import difflib

        sys.stdout.writelines(difflib.unified_diff(doc.splitlines(True), new.splitlines(True), str(DOC), "rendered"))
        sys.exit(1)


if __name__ == "__main__":
    main()
