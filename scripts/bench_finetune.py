"""Recovery fine-tuning and instruct models (issue 14's benchmark; not a test).

Quality part: the model compressed with svd-llm at each --kept (calibration: --calib-samples x --calib-seq-len tokens
of ../shared/data/calib/wiki_passages.jsonl, seed 0; default 32 x 256, the docs' peer protocol), then `lrc finetune` on the same
wiki_passages with a fixed token budget (--steps x --batch-size x --seq-len) for each --train (lrc: only the
factorised modules, WeLore's LRC-only; all: every parameter). Each model, dense included, is evaluated the same way:
WikiText-2 test perplexity on the first 32 non-overlapping 512-token windows (the training text is not WikiText) and
arc_easy, piqa, hellaswag, winogrande at --limit 200 (lm-eval, 0-shot). Training rows carry the wall time and peak
RSS of the `lrc finetune` process. "gap closed" = (ppl before - ppl after) / (ppl before - dense ppl). A
``WORK/dense-eval.json`` already there (an `lrc eval --json` of the dense model with the same options) is used as is.

Chat part (--chat): the README's main job (svd-llm 0.8, 32 x 256 self-generated calibration) with plain-text
self-generation (`selfgen_chat: 0`, the main job before issue 14) and chat-formatted (today's default), then the
chat-calibrated one fine-tuned on chat-formatted text the dense model generates (`--data selfgen`) with LM loss and
with distillation to the dense logits. Each: `lrc eval --chat --reference smollm2` (20 fixed prompts, greedy, 64 new
tokens): the share of non-empty replies and the mean KL(dense || model) over the dense replies' tokens.

Every step is one subprocess of the `lrc` CLI; results are appended to --jsonl as they finish and a rerun skips what
is there (checkpoints are kept under --work).

    python scripts/bench_finetune.py --jsonl docs/results/finetune-smollm2.jsonl --work /tmp/ft [--chat]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LRC_SHARED", ROOT.parent / "shared"))
CALIB = SHARED / "data" / "calib" / "wiki_passages.jsonl"
WIKI = SHARED / "data" / "wikitext2" / "wikitext2_raw_test.jsonl"
TASKS = "arc_easy,piqa,hellaswag,winogrande"
LRC = str(Path(sys.executable).parent / "lrc")


def run(cmd: list[str]) -> float:
    """Run ``cmd``; its wall seconds. A failure stops the benchmark with the command's last output."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - t


def evaluate(model: str, work: Path, name: str, limit: int) -> dict:
    out = work / f"{name}-eval.json"
    if not out.is_file():
        run([LRC, "eval", model, "--ppl", str(WIKI), "--seq-len", "512", "--max-windows", "32", "--tasks", TASKS,
             "--limit", str(limit), "--data-dir", str(SHARED / "data"), "--no-request-cache", "--json", str(out)])
    res = json.loads(out.read_text())
    ppl = next(iter(res["perplexity"].values()))["perplexity"]
    tasks = {k: v["acc"] for k, v in res["zero_shot"]["tasks"].items()}
    return {"perplexity": ppl, "zero_shot_acc": tasks, "zero_shot_mean_acc": res["zero_shot"]["mean"]["acc"],
            "eval_seconds": round(res["zero_shot"].get("seconds", 0), 1)}


def chat(model: str, work: Path, name: str, reference: str) -> dict:
    out = work / f"{name}-chat.json"
    if not out.is_file():
        run([LRC, "eval", model, "--chat", "--reference", reference, "--json", str(out)])
    c = json.loads(out.read_text())["chat"]
    return {"non_empty": c["non_empty"], "mean_kl": c["mean_kl"],
            "replies": [s["reply"] for s in c["samples"][:3]]}


def compress(model: str, work: Path, name: str, recipe: dict, calib: str) -> tuple[Path, float]:
    out = work / name
    secs = 0.0
    if not out.is_dir():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        secs = run([LRC, "compress", model, "--recipe", str(path), "--calib", calib, "--out", str(out)])
    return out, secs


def finetune(ckpt: Path, out: Path, args: list[str]) -> dict:
    if not out.is_dir():
        run([LRC, "finetune", str(ckpt), "--out", str(out), *args])
    ft = json.loads((out / "lrc_report.json").read_text())["finetune"]
    return {k: ft[k] for k in ("steps", "tokens", "trained_params", "total_params", "held_out_loss_before",
                               "held_out_loss_after", "seconds", "peak_rss_gib")}


def recipe(kept: float, samples: int, seq_len: int, **calibration) -> dict:
    return {"name": f"svd-llm-{kept}", "calibration": {"samples": samples, "seq_len": seq_len, "seed": 0,
                                                       **calibration},
            "engine": {"device": "cpu", "batch_size": 8}, "samples": 0,
            "stages": [{"method": "svd-llm", "param_ratio": kept}]}


def markdown(rows: list[dict]) -> str:
    """The quality rows (perplexity, zero-shot, gap closed, training cost) and the chat rows, as two tables."""
    by = {r["name"]: r for r in rows}
    lines = []
    dense = by.get("dense")
    if dense:
        lines += ["| model | kept | trained | perplexity | gap closed | zero-shot mean acc | arc_e / piqa / hs / wg | "
                  "train s | peak RSS GiB |", "|---|---:|---|---:|---:|---:|---|---:|---:|"]
        for r in rows:
            if "perplexity" not in r:
                continue
            base = by.get(f"svd-llm-{r.get('kept')}")
            gap = (f"{(base['perplexity'] - r['perplexity']) / (base['perplexity'] - dense['perplexity']):.1%}"
                   if "train" in r and base else "–")
            trained = (f"{r['train']} ({r['trained_params'] / 1e6:.1f} M of {r['total_params'] / 1e6:.1f} M)"
                       if "train" in r else "–")
            accs = " / ".join(f"{v:.3f}" for v in r["zero_shot_acc"].values())
            lines.append(f"| {r['name']} | {r.get('kept', 1.0)} | {trained} | {r['perplexity']:.2f} | {gap} | "
                         f"{r['zero_shot_mean_acc']:.4f} | {accs} | {r.get('wall_seconds', '–')} | "
                         f"{r.get('peak_rss_gib', '–')} |")
    chat = [r for r in rows if "non_empty" in r]
    if chat:
        lines += ["", "| instruct model (svd-llm 0.8) | non-empty replies | mean KL to dense replies | train s | "
                      "first reply |", "|---|---:|---:|---:|---|"]
        for r in chat:
            first = (r["replies"][0] or "(empty)").replace("|", "\\|").replace("\n", " ")[:80]
            lines.append(f"| {r['name']} | {r['non_empty']:.0%} | {r['mean_kl']:.4f} | {r.get('wall_seconds', '–')} "
                         f"| {first} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--kept", default="0.8,0.6")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--train", default="lrc,all")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--chat", action="store_true", help="also the chat part (instruct model)")
    ap.add_argument("--no-quality", action="store_true", help="only the chat part")
    ap.add_argument("--work", type=Path, required=True, help="checkpoints and eval outputs (kept for a rerun)")
    ap.add_argument("--jsonl", type=Path, required=True)
    ap.add_argument("--markdown", action="store_true", help="print the --jsonl results as tables and exit")
    a = ap.parse_args()
    if a.markdown:
        print(markdown([json.loads(x) for x in a.jsonl.read_text().splitlines()]))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    done = {json.loads(x)["name"] for x in a.jsonl.read_text().splitlines()} if a.jsonl.is_file() else set()
    budget = ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--lr",
              str(a.lr), "--warmup", str(max(1, a.steps // 10)), "--holdout", "8", "--eval-every", str(a.steps)]

    def record(name: str, **fields) -> None:
        row = {"name": name, "model": a.model, **fields}
        with a.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    if not a.no_quality:
        if "dense" not in done:
            record("dense", **evaluate(a.model, a.work, "dense", a.limit))
        for kept in [float(k) for k in a.kept.split(",")]:
            base = f"svd-llm-{kept}"
            ckpt, secs = compress(a.model, a.work, base, recipe(kept, a.calib_samples, a.calib_seq_len),
                                  str(CALIB))
            if base not in done:
                timed = {"compress_seconds": round(secs, 1)} if secs else {}  # 0: compressed by an earlier run
                record(base, kept=kept, **timed, **evaluate(str(ckpt), a.work, base, a.limit))
            for train in a.train.split(","):
                name = f"{base}-ft-{train}"
                if name in done:
                    continue
                t = time.perf_counter()
                ft = finetune(ckpt, a.work / name, ["--data", str(CALIB), "--train", train, *budget])
                record(name, kept=kept, train=train, data=CALIB.name, wall_seconds=round(time.perf_counter() - t, 1),
                       **ft, **evaluate(str(a.work / name), a.work, name, a.limit))
    if a.chat:
        for share, name in ((0, "main-job-plain-selfgen"), (None, "main-job-chat-selfgen")):
            ckpt, secs = compress(a.model, a.work, name, recipe(0.8, 32, 256, selfgen_chat=share), "selfgen")
            if name not in done:
                record(name, compress_seconds=round(secs, 1), **chat(str(ckpt), a.work, name, a.model))
        for loss in ("lm", "distill"):
            name = f"main-job-chat-selfgen-ft-{loss}"
            if name in done:
                continue
            t = time.perf_counter()
            ft = finetune(a.work / "main-job-chat-selfgen", a.work / name,
                          ["--data", "selfgen", "--selfgen-samples", "128", "--loss", loss, "--teacher", a.model,
                           *budget])
            record(name, loss=loss, data="selfgen (chat-formatted, dense model)",
                   wall_seconds=round(time.perf_counter() - t, 1), **ft, **chat(str(a.work / name), a.work, name,
                                                                                 a.model))


if __name__ == "__main__":
    main()
