"""EoRA on a model compressed elsewhere: general vs task calibration (issue 5's benchmark, part (c); not a test).

A 4-bit RTN copy of the model (asymmetric, group 128, de-quantized to floats: scripts/rtn.py) is repaired with
``lrc compensate`` at rank 32, its statistics from (general) ``../shared/data/calib/wiki_passages.jsonl``, (arc)
ARC-Easy *dev* questions with their answers (``ARC-Easy-Dev.jsonl``, format arc), or (mix) half of each — 32 windows
x 512 tokens each time. Every model is scored on WikiText-2 test (first 32 windows of 512 tokens) and on arc_easy
*test* (lm-eval task shipped with lrc, ``--limit 500``). "Gap closed" is the fraction of the RTN model's distance to
dense that the repair removes: (rtn − x) / (rtn − dense) for perplexity, (x − rtn) / (dense − rtn) for accuracy.
Parts (a) and (b) (EoRA after svd-llm, and at equal total parameters) are ``scripts/bench_quality.py``
configurations such as ``svd-llm@uniform:0.6>eora=16``. Rows are appended to --jsonl as they finish; done rows are
skipped on a rerun.

    python scripts/bench_eora.py --jsonl docs/results/eora-rtn-smollm2.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHARED = Path(os.environ.get("LRC_SHARED", ROOT.parent / "shared"))
GENERAL = SHARED / "data" / "calib" / "wiki_passages.jsonl"
ARC_DEV = SHARED / "data" / "arc_easy" / "ARC-Easy-Dev.jsonl"
WIKI = SHARED / "data" / "wikitext2" / "wikitext2_raw_test.jsonl"
CALIB = {"general": {"dataset": str(GENERAL)}, "arc": {"dataset": str(ARC_DEV)},
         "mix": {"mix": [{"dataset": str(GENERAL)}, {"dataset": str(ARC_DEV)}]}}


def score(model, tok, a) -> dict:
    from compress.eval.run import evaluate_model
    from compress.recipe import EvalConfig

    cfg = EvalConfig(ppl=[str(WIKI)], seq_len=512, max_windows=a.windows, tasks=["arc_easy"], limit=a.limit,
                     data_dir=str(SHARED / "data"), batch_size=8)
    res = evaluate_model(model, tok, cfg)
    arc = res["zero_shot"]["tasks"]["arc_easy"]
    return {"perplexity": res["perplexity"][str(WIKI)]["perplexity"], "arc_easy_acc": arc["acc"],
            "arc_easy_acc_norm": arc["acc_norm"], "arc_easy_n": arc["n"]}


def ratio_of_rank(model: str, rank: int) -> float:
    """The EXTRA-parameter ratio ``rank·Σ(m+n) / Σm·n`` of rank ``rank`` on every decoder-block Linear (rounded up
    in the 6th digit; the allocator's budget is then at least uniform's, and it stays within one rank step)."""
    from compress.api import plan
    from compress.recipe import parse_recipe

    rows = plan(model, parse_recipe({"stages": [{"method": "eora", "rank": rank}]}))
    mn = sum(r.out_features * r.in_features for r in rows)
    return round(rank * sum(r.out_features + r.in_features for r in rows) / mn + 5e-7, 6)


def run_step(step: str, a, rtn_dir: Path) -> dict:
    import torch

    from compress import api
    from compress.models import load_model

    torch.set_num_threads(int(os.environ.get("LRC_THREADS", "2")))
    row: dict = {"step": step, "model": a.model, "bits": a.bits, "group": a.group}
    if step in ("dense", "rtn"):
        model, tok, _ = load_model(a.model if step == "dense" else str(rtn_dir))
    else:
        source, _, allocator = step.removeprefix("eora-").partition("-")
        out = Path(a.work) / f"{rtn_dir.name}-eora{a.rank}-{step}"
        budget = {"rank": a.rank}
        if allocator:  # the same extra parameters as rank a.rank everywhere, spread by a global allocator
            budget = {"param_ratio": ratio_of_rank(a.model, a.rank), "allocator": allocator}
        t = time.perf_counter()
        model, report = api.compensate(a.model, str(rtn_dir), out, **budget,
                                       calibration={**CALIB[source], "samples": a.samples, "seq_len": a.seq_len},
                                       overwrite=True, progress=False)
        tok = load_model(str(out))[1]
        row.update({"rank": a.rank, **budget, "calibration": f"{source} {a.samples}x{a.seq_len}",
                    "compensate_seconds": round(time.perf_counter() - t, 1),
                    "extra_params": report["targeted"]["params_after"] - report["targeted"]["params_before"],
                    "dropped_eigenvalues": sum(r.get("dropped_eigenvalues") or 0 for r in report["modules"])})
    t = time.perf_counter()
    row.update(score(model, tok, a))
    row["eval_seconds"] = round(time.perf_counter() - t, 1)
    return row


def gap_table(rows: list[dict]) -> str:
    by = {r["step"]: r for r in rows}
    if not {"dense", "rtn"} <= set(by):
        return "(needs the dense and rtn rows)"
    d, q = by["dense"], by["rtn"]
    lines = ["| model | WikiText-2 ppl | gap closed | arc_easy acc | gap closed | acc_norm | gap closed |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def closed(x, key, lower_better):
        span = (q[key] - d[key]) if lower_better else (d[key] - q[key])
        if abs(span) < 1e-12:
            return "–"
        return f"{((q[key] - x[key]) if lower_better else (x[key] - q[key])) / span:.0%}"

    for r in rows:
        lines.append(f"| {r['step']} | {r['perplexity']:.3f} | {closed(r, 'perplexity', True)} | "
                     f"{r['arc_easy_acc']:.3f} | {closed(r, 'arc_easy_acc', False)} | {r['arc_easy_acc_norm']:.3f} | "
                     f"{closed(r, 'arc_easy_acc_norm', False)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", nargs="*", default=["dense", "rtn", "eora-general", "eora-arc", "eora-general-loss",
                                                  "eora-mix"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "lrc" / "bench"))
    ap.add_argument("--jsonl", type=Path, required=True)
    ap.add_argument("--markdown", action="store_true", help="print the --jsonl results as a table and exit")
    a = ap.parse_args()
    rows = [json.loads(line) for line in a.jsonl.read_text().splitlines()] if a.jsonl.is_file() else []
    if a.markdown:
        print(gap_table(rows))
        return
    from compress.models import load_model
    from rtn import rtn_quantize

    rtn_dir = Path(a.work) / f"{Path(a.model).name}-rtn{a.bits}-g{a.group}"
    if not (rtn_dir / "config.json").is_file():
        model, tok, _ = load_model(a.model)
        rtn_quantize(model, a.bits, a.group).save_pretrained(rtn_dir)
        tok.save_pretrained(rtn_dir)
    done = {r["step"] for r in rows}
    for step in a.steps:
        if step in done:
            continue
        row = run_step(step, a, rtn_dir)
        rows.append(row)
        with a.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(gap_table(rows))


if __name__ == "__main__":
    main()
