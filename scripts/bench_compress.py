"""Benchmark lrc compression under the shared peer protocol (../shared/README.md, "Targets").

Calibration: 32 windows x 256 tokens of ../shared/data/calib/wiki_passages.jsonl (rows joined with "\\n\\n", no
special tokens, seed 0). Evaluation: the first 32 non-overlapping 512-token windows of WikiText-2 test. fp32, CPU.
"kept" = fraction of decoder-block Linear parameters kept, r = floor(kept*m*n/(m+n)) per matrix.

Each configuration runs in its own process so that peak RSS is that run's own. Also measured, in the same process
as each compression: one plain forward pass of the dense model over the same calibration tokens (batch 8), the
natural unit for "how expensive is compression".

    python scripts/bench_compress.py --model smollm2 --runs svd-llm:0.8 svd-llm:0.6 svd:0.8 --json out.json
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
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "KEPT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.model, a.one[0], float(a.one[1]), a.samples, a.seq_len, a.windows, a.cache,
                             {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.engine)})))
        return
    results = []
    for run in a.runs:
        method, _, kept = run.partition(":")
        cmd = [sys.executable, __file__, "--model", a.model, "--samples", str(a.samples), "--seq-len",
               str(a.seq_len), "--windows", str(a.windows), "--cache", a.cache, "--engine", *a.engine,
               "--one", method, kept or "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{a.model:10s} {method:8s} kept={kept or 1:4} ppl={r['wikitext2_ppl']:10.2f} "
              f"compress_s={r.get('compress_seconds', float('nan')):7.1f} "
              f"forward_s={r.get('forward_seconds', float('nan')):6.1f} peak_rss={r['peak_rss_gib']:.2f} GiB",
              flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
