"""Benchmark lrc compression under the shared peer protocol (../shared/README.md, "Targets").

Calibration: 32 windows x 256 tokens of ../shared/data/calib/wiki_passages.jsonl (rows joined with "\\n\\n", no
special tokens, seed 0). Evaluation: the first 32 non-overlapping 512-token windows of WikiText-2 test. fp32, CPU.
"kept" = fraction of decoder-block Linear parameters kept, r = floor(kept*m*n/(m+n)) per matrix.

Each configuration runs in its own process so that peak RSS is that run's own. Also measured, in the same process
as each compression: one plain forward pass of the dense model over the same calibration tokens (batch 8), the
natural unit for "how expensive is compression".

Every result is appended to --jsonl as soon as it is measured (the raw file docs/benchmarks.md's compress-time table
is rendered from, with ``--markdown``), together with the engine options, the protocol, the lrc revision and the
1-minute load average before and after the run: a timing taken while other jobs shared the CPU (load average >= 1.5
on this 2-core machine) is marked as such in the rendered table instead of being passed off as the tool's speed.

    python scripts/bench_compress.py --model smollm2 --runs svd-llm:0.8 svd-llm:0.6 svd:0.8 \
        --jsonl docs/results/compress-smollm2.jsonl
    python scripts/bench_compress.py --jsonl docs/results/compress-smollm2.jsonl --markdown
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LRC_SHARED", ROOT.parent / "shared"))
CALIB = SHARED / "data" / "calib" / "wiki_passages.jsonl"
WIKI = SHARED / "data" / "wikitext2" / "wikitext2_raw_test.jsonl"
CONTENDED = 0.1  # share of the machine's CPU time used by OTHER processes during a run: above it, not lrc's timing


def busy_jiffies() -> int:
    """CPU time (clock ticks) all processes have spent on this machine so far (user, nice, system, irq, steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait


def other_cpu_share(busy: int, children_cpu: float, wall: float) -> float:
    """Share of the whole machine's CPU time that processes other than the measured run used during it."""
    ticks = os.sysconf("SC_CLK_TCK")
    return max(0.0, (busy / ticks - children_cpu) / (wall * (os.cpu_count() or 1)))


def contention(r: dict) -> float | None:
    """The measured other-process CPU share of a raw row (older rows only have load averages: None)."""
    return r.get("other_cpu_share")


def revision() -> str:
    """``git rev-parse --short HEAD``, with ``+dirty`` when tracked files differ from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def engine_mode(engine: dict) -> str:
    if not engine:
        return "default"
    if engine == {"propagate": "original", "sequential": False}:
        return "paper protocol"
    if engine == {"objective": "dense"}:
        return "dense objective"
    return ", ".join(f"{k}={v}" for k, v in engine.items())


def markdown(rows: list[dict]) -> str:
    """The compress-time table of docs/benchmarks.md, one row per raw result, in the order measured."""
    lines = ["| model | method | engine mode | kept | WikiText-2 ppl | compress s | forward s | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    contended = False
    for r in rows:
        share = contention(r)
        mark = ""
        if share is None or share >= CONTENDED:
            mark, contended = (" (contended?)" if share is None else f" (others {share:.0%})"), True
        secs = r.get("compress_seconds")
        fwd = r.get("forward_seconds")
        kept = "1" if r["method"] == "dense" else f"{r['kept']:g} ({r['kept_fraction_of_targeted']:.4f})"
        lines.append(f"| {Path(r['model']).name} | {r['method']} | "
                     f"{'–' if r['method'] == 'dense' else engine_mode(r.get('engine', {}))} | {kept} | "
                     f"{r['wikitext2_ppl']:,.2f} | {'–' if secs is None else f'{secs:.1f}{mark}'} | "
                     f"{'–' if fwd is None else f'{fwd:.1f}{mark}'} | {r['peak_rss_gib']:.2f} GiB |")
    if contended:
        lines += ["", f"Timings marked (others X%) were measured while other processes used {CONTENDED:.0%} or more "
                  "of the machine's CPU time (measured from /proc/stat minus the run's own CPU time); (contended?) "
                  "marks rows recorded before that was measured. They show that run, not lrc's speed. Perplexity "
                  "and peak RSS do not depend on it."]
    return "\n".join(lines)


def one(model_spec: str, method: str, kept: float, samples: int, seq_len: int, windows: int, cache: str,
        engine: dict) -> dict:
    import torch

    from compress import compress_model
    from compress.calibration import calibration_tokens
    from compress.eval.perplexity import perplexity
    from compress.models import load_model
    from compress.recipe import parse_recipe
    from compress.report import peak_rss_gib

    torch.set_num_threads(int(os.environ.get("LRC_THREADS", "2")))
    model, tok, _ = load_model(model_spec)
    text = "\n\n".join(json.loads(line)["text"] for line in WIKI.read_text().splitlines())
    out = {"model": model_spec, "method": method, "kept": kept}
    if method == "dense":
        rss_before = peak_rss_gib()
        recipe = parse_recipe({"calibration": {"dataset": str(CALIB), "samples": samples, "seq_len": seq_len},
                               "stages": [{"method": "svd", "param_ratio": 1.0}]})
        ids = calibration_tokens(model, tok, recipe.calibration, Path(cache))
        t = time.perf_counter()
        with torch.no_grad():
            for s in range(0, ids.shape[0], 8):
                model(ids[s : s + 8], use_cache=False)
        out["forward_seconds"] = time.perf_counter() - t
        out["peak_rss_gib_after_load"] = rss_before
    else:
        recipe = parse_recipe({"calibration": {"dataset": str(CALIB), "samples": samples, "seq_len": seq_len},
                               "engine": {"device": "cpu", "batch_size": 8, **engine},
                               "stages": [{"method": method, "param_ratio": kept}]})
        t = time.perf_counter()
        report = compress_model(model, recipe, tok, cache_dir=cache)
        out["compress_seconds"] = time.perf_counter() - t
        out["kept_fraction_of_targeted"] = report["targeted"]["kept_fraction_of_targeted"]
    out["peak_rss_gib"] = peak_rss_gib()
    res = perplexity(model, tok, text, seq_len=512, max_windows=windows, batch_size=4)
    out.update(wikitext2_ppl=res.perplexity, eval_tokens=res.tokens, eval_windows=res.windows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--runs", nargs="+", default=["dense", "svd-llm:0.8", "svd-llm:0.6", "svd:0.8"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "lrc-bench"))
    ap.add_argument("--engine", nargs="*", default=[], metavar="KEY=VALUE",
                    help="engine options, e.g. objective=dense propagate=original sequential=false")
    ap.add_argument("--json", type=Path, help="also write this invocation's results as one JSON list")
    ap.add_argument("--jsonl", type=Path, help="append every result to this raw file as it is measured")
    ap.add_argument("--markdown", action="store_true", help="print the --jsonl results as a table and exit")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "KEPT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.markdown:
        if not a.jsonl:
            sys.exit("--markdown needs --jsonl")
        print(markdown([json.loads(line) for line in a.jsonl.read_text().splitlines() if line.strip()]))
        return
    engine = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.engine)}
    if a.one:
        print(json.dumps(one(a.model, a.one[0], float(a.one[1]), a.samples, a.seq_len, a.windows, a.cache, engine)))
        return
    results = []
    for run in a.runs:
        method, _, kept = run.partition(":")
        cmd = [sys.executable, __file__, "--model", a.model, "--samples", str(a.samples), "--seq-len",
               str(a.seq_len), "--windows", str(a.windows), "--cache", a.cache, "--engine", *a.engine,
               "--one", method, kept or "1"]
        load_before = os.getloadavg()[0]
        busy0, kids0, t0 = busy_jiffies(), resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        share = other_cpu_share(busy_jiffies() - busy0, (kids1.ru_utime + kids1.ru_stime) -
                                (kids0.ru_utime + kids0.ru_stime), time.monotonic() - t0)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        r.update(engine=engine, samples=a.samples, seq_len=a.seq_len, windows=a.windows,
                 threads=int(os.environ.get("LRC_THREADS", "2")), revision=revision(),
                 load_average_before=load_before, load_average_after=os.getloadavg()[0],
                 other_cpu_share=round(share, 4),
                 measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if a.jsonl:
            with a.jsonl.open("a") as f:
                f.write(json.dumps(r) + "\n")
        print(f"{a.model:10s} {method:8s} kept={kept or 1:4} ppl={r['wikitext2_ppl']:10.2f} "
              f"compress_s={r.get('compress_seconds', float('nan')):7.1f} "
              f"forward_s={r.get('forward_seconds', float('nan')):6.1f} peak_rss={r['peak_rss_gib']:.2f} GiB",
              flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
