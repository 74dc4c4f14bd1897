"""Every method x allocator on the real stories260k at one budget (the table "stories260k, for comparison" in
docs/benchmarks.md); not a test, but the same setting as tests/test_stories260k.py.

Protocol: ../shared/models/stories260k (fp32, CPU); calibration = 32 windows x 128 tokens sampled from the model
itself (``selfgen``, seeded), default engine (``propagate: compressed``, ``sequential: true``, ``objective:
layer``); perplexity on tests/data/tinystories_style.txt in non-overlapping 128-token windows. ``kept`` is the
stage's ``param_ratio`` (fraction of decoder-block Linear parameters kept); the kept fraction actually reached is
recorded per row. Configurations use scripts/bench_quality.py's syntax (``METHOD[+OPT=V]@ALLOCATOR:KEPT``).

All configurations run in one process (the model has 260k parameters; the point is perplexity, not time or memory).
Each result is appended to --jsonl as it finishes, with the protocol, versions and the load average beside it;
``--markdown`` renders the file as the table in docs/benchmarks.md.

``--eora``: the EoRA fixture of tests/test_eora.py instead: a 4-bit round-to-nearest copy of stories260k (groups of
32, scripts/rtn.py) repaired by ``lrc compensate`` (``compress.api.compensate``) at rank 8 everywhere, and with the
same extra parameters (``param_ratio`` 8·Σ(m+n)/Σm·n) spread by the ``loss`` and ``energy`` allocators; statistics
from 16 x 128 self-generated tokens; same perplexity protocol.

    python scripts/bench_stories260k.py --jsonl docs/results/allocators-stories260k.jsonl
    python scripts/bench_stories260k.py --jsonl docs/results/allocators-stories260k.jsonl --markdown
    python scripts/bench_stories260k.py --eora --jsonl docs/results/eora-stories260k.jsonl
    python scripts/bench_stories260k.py --eora --jsonl docs/results/eora-stories260k.jsonl --markdown
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compress import revision  # noqa: E402
from bench_quality import parse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LRC_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260k"
TEXT = ROOT / "tests" / "data" / "tinystories_style.txt"
KEPT = 0.8
CONFIGS = ["dense"] + [f"{c}:{KEPT}" for c in (
    "svd@uniform", "svd@welore",
    "asvd@uniform", "asvd@energy", "asvd@sensitivity",
    "fwsvd@uniform", "fwsvd+axis=output@uniform",
    "svd-llm@uniform", "svd-llm@energy", "svd-llm@welore", "svd-llm@loss", "svd-llm@sensitivity",
    "lord@uniform", "lord+variant=weights@uniform")]
COLUMNS = ["uniform", "energy", "welore", "loss", "sensitivity"]
EORA_STEPS = ["dense", "rtn", "eora-uniform", "eora-loss", "eora-energy"]
EORA_RANK = 8


def provenance() -> dict:
    """What every raw row records about how it was measured: the eval text, the code and library versions."""
    import torch
    import transformers

    return {"eval": f"{TEXT.relative_to(ROOT)}, non-overlapping 128-token windows", "revision": revision(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def finished(jsonl: Path, key: str) -> set:
    """The ``key`` of every row already in ``jsonl`` (a rerun measures only what is missing)."""
    return {json.loads(line)[key] for line in jsonl.read_text().splitlines()} if jsonl.is_file() else set()


def run(configs: list[str], jsonl: Path, cache: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress import compress_model
    from compress.eval.perplexity import perplexity
    from compress.recipe import parse_recipe

    torch.set_num_threads(int(os.environ.get("LRC_THREADS", "2")))
    tok = AutoTokenizer.from_pretrained(STORIES)
    text = TEXT.read_text()
    common = {"model": str(STORIES.name), "calibration": "selfgen 32x128 (seed 0)",
              **provenance()}
    done = finished(jsonl, "config")
    for config in configs:
        if config in done:
            continue
        c = parse(config)
        model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
        row = {"config": config, **c, **common, "load_average_before": os.getloadavg()[0]}
        t = time.perf_counter()
        if c["method"] != "dense":
            recipe = parse_recipe({"calibration": {"dataset": "selfgen", "samples": 32, "seq_len": 128},
                                   "engine": {"device": "cpu", **c["engine"]},
                                   "stages": [{"method": c["method"], "param_ratio": c["kept"],
                                               "options": c["options"], "allocator": c["allocator"]}]})
            report = compress_model(model, recipe, tok, cache_dir=cache)
            row.update(kept_measured=report["targeted"]["kept_fraction_of_targeted"],
                       params_after=report["targeted"]["params_after"],
                       params_before=report["targeted"]["params_before"])
        res = perplexity(model, tok, text, seq_len=128)
        row.update(perplexity=res.perplexity, eval_tokens=res.tokens, eval_windows=res.windows,
                   seconds=round(time.perf_counter() - t, 1), load_average_after=os.getloadavg()[0])
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{config:32s} ppl {row['perplexity']:10.2f}  kept {row.get('kept_measured', 1.0):.4f}", flush=True)


def run_eora(steps: list[str], jsonl: Path, cache: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress import api
    from compress.eval.perplexity import perplexity
    from compress.recipe import parse_recipe
    from rtn import rtn_quantize

    torch.set_num_threads(int(os.environ.get("LRC_THREADS", "2")))
    tok = AutoTokenizer.from_pretrained(STORIES)
    text = TEXT.read_text()
    rtn_dir = cache / "stories260k-rtn4-g32"
    rtn_quantize(AutoModelForCausalLM.from_pretrained(STORIES), bits=4, group=32).save_pretrained(rtn_dir)
    tok.save_pretrained(rtn_dir)
    rows = api.plan(str(STORIES), parse_recipe({"stages": [{"method": "eora", "rank": EORA_RANK}]}))
    ratio = round(EORA_RANK * sum(r.out_features + r.in_features for r in rows) /
                  sum(r.out_features * r.in_features for r in rows) + 5e-7, 6)  # rank 8's extra parameters
    common = {"model": STORIES.name, "rtn": "4 bits, groups of 32 (scripts/rtn.py)",
              "calibration": "selfgen 16x128 (seed 0)",
              **provenance()}
    done = finished(jsonl, "step")
    for step in steps:
        if step in done:
            continue
        row = {"step": step, **common, "load_average_before": os.getloadavg()[0]}
        if step in ("dense", "rtn"):
            model = AutoModelForCausalLM.from_pretrained(STORIES if step == "dense" else rtn_dir).eval()
        else:
            allocator = step.removeprefix("eora-")
            budget = {"rank": EORA_RANK} if allocator == "uniform" else {"param_ratio": ratio, "allocator": allocator}
            model, report = api.compensate(str(STORIES), str(rtn_dir), cache / f"ck-{step}", **budget,
                                           calibration={"dataset": "selfgen", "samples": 16, "seq_len": 128},
                                           overwrite=True, cache_dir=cache / "runs", progress=False)
            row.update(budget=budget, extra_params=report["targeted"]["params_after"] -
                       report["targeted"]["params_before"])
        res = perplexity(model.eval(), tok, text, seq_len=128)
        row.update(perplexity=res.perplexity, eval_tokens=res.tokens, load_average_after=os.getloadavg()[0])
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{step:14s} ppl {row['perplexity']:.4f}", flush=True)


def eora_markdown(rows: list[dict]) -> str:
    by = {r["step"]: r for r in rows}
    d, q = by["dense"]["perplexity"], by["rtn"]["perplexity"]
    lines = ["| model | extra parameters | perplexity | gap closed |", "|---|---:|---:|---:|"]
    for r in rows:
        gap = "–" if r["step"] in ("dense", "rtn") else f"{(q - r['perplexity']) / (q - d):.0%}"
        lines.append(f"| {r['step']} | {r.get('extra_params', 0):,} | {r['perplexity']:.3f} | {gap} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """Methods down, allocators across; a variant of a method (``+option``) is named in its row."""
    dense = next(r for r in rows if r["method"] == "dense")
    table: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["method"] == "dense":
            continue
        method, *opts = r["config"].rsplit(":", 1)[0].split("@")[0].split("+")
        label = method + (f" ({', '.join(o.replace('=', ': ') for o in opts)})" if opts else "")
        table.setdefault(label, {})[r["allocator"]] = f"{r['perplexity']:,.2f}"
    lines = [f"Dense: {dense['perplexity']:.2f}. Kept {KEPT} of the targeted parameters (measured per row in the "
             "raw file).", "", "| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for label, cells in table.items():
        lines.append(f"| {label} | " + " | ".join(cells.get(c, "") for c in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jsonl", type=Path, required=True)
    ap.add_argument("--configs", nargs="*", default=CONFIGS)
    ap.add_argument("--cache", type=Path, help="lrc cache (calibration tokens, sweeps); default: a fresh temp dir")
    ap.add_argument("--markdown", action="store_true", help="print the --jsonl results as a table and exit")
    ap.add_argument("--eora", action="store_true", help="the EoRA fixture (RTN stories260k + compensate) instead")
    a = ap.parse_args()
    if a.markdown:
        rows = [json.loads(line) for line in a.jsonl.read_text().splitlines()]
        print(eora_markdown(rows) if a.eora else markdown(rows))
        return
    with tempfile.TemporaryDirectory(prefix="lrc-bench-") as tmp:
        cache = a.cache or Path(tmp)
        os.environ["LRC_CACHE"] = str(cache)  # the sensitivity sweep is measured, not read from an older run
        if a.eora:
            run_eora(EORA_STEPS, a.jsonl, cache)
        else:
            run(a.configs, a.jsonl, cache)


if __name__ == "__main__":
    main()
