"""Issue 25's comparison: perplexity against checkpoint bytes — quantization alone (RTN, GPTQ), low rank in
bfloat16, and low rank with quantized factors (not a test).

Rows are ``scripts/bench_usable.py`` configurations (its protocol: SmolLM2-135M-Instruct in fp32 on the CPU,
calibration 64 × 512 tokens of wiki_passages, WikiText-2 on the first 32 × 512 windows), run by it into
``--jsonl``; this script renders them: a markdown table and an SVG plot of perplexity (log scale) against the bytes
of the checkpoint as a bfloat16 model would store it (quantized tensors as written, every other tensor at 2 bytes;
embeddings and head included, quantized only in the ``+e8`` / ``+e4`` rows), one curve per family.

    python scripts/bench_usable.py --no-chat --jsonl docs/results/bytes-smollm2-64x512.jsonl \\
        --configs dense+q4rtn:1 dense+q3rtn:1 dense+q4:1 dense+q3:1 svd-llm+q4:0.8 modegpt+q4:0.8 ...
    python scripts/bench_bytes.py --jsonl docs/results/bytes-smollm2-64x512.jsonl --svg docs/results/bytes.svg

Speed: ``lrc bench CHECKPOINT --reference smollm2 --dtype bfloat16 --json B.json`` on checkpoints kept with
``bench_usable.py --keep DIR``, then ``--speed-jsonl docs/results/bytes-speed-smollm2.jsonl --speed CONFIG=B.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DENSE_PPL_JSON = ROOT / "docs" / "results" / "smollm2-dense-eval.json"


def family(config: str) -> str:
    """The curve a row belongs to: ``RTN`` / ``GPTQ`` (quantization alone), a byte-budget search (``+bytes``), else
    its method (and refinement) with ``+ int8`` / ``+ int4`` … for quantized factors, ``bf16`` without; quantized
    embeddings (``+e8`` / ``+e4``) name their own curve (``, emb int4``): compare like with like; EoRA residuals
    on the quantized matrices (``+cN``, ``+cNiB``) add `` + EoRA rN`` (`` intB``)."""
    head = config.rsplit(":", 1)[0]
    name, *mods = head.split("+")
    emb = next((m for m in mods if m in ("e8", "e4")), None)
    tail = f", emb int{emb[1]}" if emb else ""
    mods = [m for m in mods if m != emb]
    comp = next((m for m in mods if re.fullmatch(r"c\d+(i\d+)?", m)), None)
    rank, _, bits = (comp or "")[1:].partition("i")
    tail = (f" + EoRA r{rank}" + (f" int{bits}" if bits else "") if comp else "") + tail
    mods = [m for m in mods if m != comp]
    q = next((m for m in mods if m.startswith("q")), None)
    if "bytes" in mods:
        return f"{name} byte budget{tail}"
    if name == "dense":  # calibrated on self-generated chat text (``+chat`` / ``+chatq``): a curve of its own
        chat = " on chat text" if {"chat", "chatq"} & set(mods) else ""
        return ("RTN" if q and q.endswith("rtn") else "GPTQ" if q else "bf16") + chat + tail
    base = "+".join([name, *(m for m in mods if not m.startswith("q"))])
    return (f"{base} + {'RTN ' if q and q.endswith('rtn') else ''}int{q[1]}" if q else f"{base} (bf16)") + tail


def dense_bytes(rows: list[dict]) -> int:
    return 2 * next(r["dense_params"] for r in rows if r.get("dense_params"))


def gptq_curve(rows: list[dict], config: str, nbytes: int) -> float | None:
    """The perplexity of GPTQ's curve (quantization alone, the same embedding treatment as ``config``) at
    ``nbytes``: geometric interpolation between its two points around it (the straight segment of the log-scale
    plot); None outside its range, or for GPTQ's own rows."""
    fam = family(config)
    if fam.startswith("GPTQ") and "EoRA" not in fam:
        return None
    want = "GPTQ" + fam[fam.index(", emb"):] if ", emb" in fam else "GPTQ"
    pts = sorted((r["bf16_bytes"], r["perplexity"]) for r in rows if family(r["config"]) == want)
    for (b0, p0), (b1, p1) in zip(pts, pts[1:]):
        if b0 <= nbytes <= b1:
            return p0 * (p1 / p0) ** ((nbytes - b0) / (b1 - b0))
    return None


def markdown(rows: list[dict], dense_ppl: float, dense_answers: float | None = None) -> str:
    """Every row by bytes; "GPTQ here" is GPTQ's curve at the row's bytes (``gptq_curve``): the issue's goal is a
    perplexity below it. "answers": the answer score of ``lrc eval --chat`` (– where the row ran ``--no-chat``)."""
    total = dense_bytes(rows)

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = ["| configuration | family | bytes (bf16 checkpoint) | of dense | perplexity | × dense | GPTQ here | "
             "answers | quantized matrices: bytes kept | weighted error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| dense | bf16 | {total:,} | 1.000 | {dense_ppl:.2f} | 1.00 | – | {f(dense_answers, '.2f')} | – | – |"]
    for r in sorted(rows, key=lambda r: r["bf16_bytes"]):
        q = r.get("quantization") or {}
        kept = f"{q['kept_bytes_fraction']:.3f}" if q else "–"
        err = f"{q['mean_rel_error']:.4f}" if q else "–"
        g = gptq_curve(rows, r["config"], r["bf16_bytes"])
        lines.append(f"| {r['config']} | {family(r['config'])} | {r['bf16_bytes']:,} | "
                     f"{r['bf16_bytes'] / total:.3f} | {r['perplexity']:,.2f} | {r['perplexity'] / dense_ppl:.2f} | "
                     f"{f(g, ',.2f')} | {f(r.get('answer_score'), '.2f')} | {kept} | {err} |")
    return "\n".join(lines)


DASHES = ["", "6 3", "2 2"]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def svg(rows: list[dict], dense_ppl: float, width: int = 760, height: int = 460) -> str:
    """Perplexity (log) against the fraction of the dense bf16 bytes, one polyline per family (points sorted by
    bytes), the dense model as a point at (1, its perplexity)."""
    total = dense_bytes(rows)
    pts: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows:
        pts.setdefault(family(r["config"]), []).append((r["bf16_bytes"] / total, r["perplexity"], r["config"]))
    left, top, bottom = 70, 20, 50
    right = max(250, 40 + 7 * max(len(f) for f in pts))  # the legend's column, as wide as its longest name
    width, height = width + right - 250, max(height, top + 40 + 16 * len(pts) + bottom)
    xs = [x for v in pts.values() for x, _, _ in v] + [1.0]
    ys = [y for v in pts.values() for _, y, _ in v] + [dense_ppl]
    x0, x1 = 0.0, max(1.05, max(xs) * 1.05)
    y0, y1 = math.log10(min(ys) / 1.2), math.log10(min(max(ys), 1e4) * 1.2)

    def X(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def Y(y):
        return top + (y1 - math.log10(min(max(y, 1e-9), 1e4))) / (y1 - y0) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for k in range(int(x1 / 0.1) + 1):  # x grid every 0.1
        x = k * 0.1
        out.append(f'<line x1="{X(x):.1f}" y1="{top}" x2="{X(x):.1f}" y2="{height - bottom}" stroke="#eee"/>')
        out.append(f'<text x="{X(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:.1f}</text>')
    for e in range(math.floor(y0), math.ceil(y1) + 1):
        for m in (1, 2, 5):
            y = m * 10 ** e
            if y0 <= math.log10(y) <= y1:
                out.append(f'<line x1="{left}" y1="{Y(y):.1f}" x2="{width - right}" y2="{Y(y):.1f}" stroke="#eee"/>')
                out.append(f'<text x="{left - 6}" y="{Y(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">checkpoint bytes '
               f'/ dense bf16 bytes (embeddings and head included)</text>')
    out.append(f'<text x="16" y="{(top + height - bottom) / 2}" transform="rotate(-90 16 {(top + height - bottom) / 2})" '
               f'text-anchor="middle">WikiText-2 perplexity (log)</text>')
    out.append(f'<circle cx="{X(1.0):.1f}" cy="{Y(dense_ppl):.1f}" r="4" fill="black"/>')
    out.append(f'<text x="{width - right + 10}" y="{top + 12}">● dense bf16 ({dense_ppl:.2f})</text>')
    for i, (fam, p) in enumerate(sorted(pts.items())):
        c = COLORS[i % len(COLORS)]
        dash = DASHES[i // len(COLORS) % len(DASHES)]  # past the palette: the same colours dashed, then dotted
        dash = f' stroke-dasharray="{dash}"' if dash else ""
        p = sorted(p)
        out.append('<polyline fill="none" stroke="{}" stroke-width="2"{} points="{}"/>'.format(
            c, dash, " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y, _ in p)))
        for x, y, cfg in p:
            out.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3.5" fill="{c}"><title>{cfg}: {y:.2f} at '
                       f'{x:.3f}</title></circle>')
        ly = top + 30 + 16 * i
        out.append(f'<line x1="{width - right + 10}" y1="{ly - 4}" x2="{width - right + 26}" y2="{ly - 4}" '
                   f'stroke="{c}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{width - right + 30}" y="{ly}" fill="{c}">{fam}</text>')
    out.append("</svg>")
    return "\n".join(out)


def dense_perplexity() -> float:
    """The dense model's WikiText-2 perplexity under the same protocol (``docs/results/smollm2-dense-eval.json``)."""
    return next(iter(json.loads(DENSE_PPL_JSON.read_text())["perplexity"].values()))["perplexity"]


def dense_answers(rows: list[dict]) -> float | None:
    """The dense model's answer score, as every row with ``lrc eval --chat`` measured it beside its own."""
    scores = {r["reference_answer_score"] for r in rows if r.get("reference_answer_score") is not None}
    return scores.pop() if len(scores) == 1 else None


def speed_markdown(rows: list[dict]) -> str:
    """``lrc bench`` of kept checkpoints against the dense model, one row each (``{"config", "bench"}``, the bench's
    JSON): both models in the run's dtype, interleaved, medians; "speed-up" is the median of the per-round ratios
    (model over dense, back to back), "paths" how many quantized matrices took each forward path."""
    lines = ["| configuration | dtype | on disk MiB | weights at run time GiB | quantized matrices' paths | "
             "prefill tok/s @512 | decode tok/s @1 | decode tok/s @8 | speed-up prefill @512 | decode @1 | "
             "decode @8 |", "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    dense = rows[0]["bench"]["models"]["reference"]

    def fmt(d):
        return (f"{d['checkpoint_bytes'] / 2**20:,.1f} | {d.get('run_weights_gib', d['weights_gib']):.3f} | "
                f"{', '.join(f'{k} {v}' for k, v in sorted(d.get('quant_paths', {}).items())) or '–'} | "
                f"{d['prefill_tokens_per_s']['512']:.0f} | {d['decode_tokens_per_s']['1']:.1f} | "
                f"{d['decode_tokens_per_s']['8']:.1f}")

    lines.append(f"| dense (reference, first run) | {rows[0]['bench']['dtype']} | {fmt(dense)} | – | – | – |")
    for r in rows:
        b = r["bench"]
        up = b["measured_speedup"]
        lines.append(f"| {r['config']} | {b['dtype']} | {fmt(b['models']['model'])} | {up['prefill@512']:.2f}× | "
                     f"{up['decode@b1']:.2f}× | {up['decode@b8']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jsonl", type=Path, help="bench_usable.py's rows: print their table")
    ap.add_argument("--svg", type=Path, help="write the plot here")
    ap.add_argument("--speed", nargs="*", metavar="CONFIG=BENCH.json",
                    help="append these lrc bench results (--json files) to --speed-jsonl, then print its table")
    ap.add_argument("--speed-jsonl", type=Path)
    a = ap.parse_args()
    if a.speed_jsonl:
        with a.speed_jsonl.open("a") as fh:
            for item in a.speed or []:
                config, path = item.split("=", 1)
                fh.write(json.dumps({"config": config, "bench": json.loads(Path(path).read_text())}) + "\n")
        print(speed_markdown([json.loads(x) for x in a.speed_jsonl.read_text().splitlines() if x.strip()]))
        return
    if not a.jsonl:
        ap.error("--jsonl or --speed-jsonl is required")
    rows = [json.loads(line) for line in a.jsonl.read_text().splitlines() if line.strip()]
    dense_ppl = dense_perplexity()
    print(markdown(rows, dense_ppl, dense_answers(rows)))
    if a.svg:
        a.svg.write_text(svg(rows, dense_ppl))


if __name__ == "__main__":
    main()
