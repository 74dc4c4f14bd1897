"""Quality of every method and allocator at equal parameter budgets (issue 4's benchmark; not a test).

Default protocol: calibration = 64 windows x 512 tokens of ../shared/data/calib/wiki_passages.jsonl (seed 0);
evaluation = WikiText-2 test, the first 32 non-overlapping 512-token windows; fp32, CPU, 2 threads. "kept" is the
fraction of decoder-block Linear parameters kept (embeddings and lm_head excluded), as measured on the result.
Each configuration runs in its own process (its own peak RSS); results are appended to --jsonl as they finish, so an
interrupted run keeps what it measured. A configuration is METHOD[+OPTION=VALUE...]@ALLOCATOR:KEPT[#ENGINE=VALUE,...],
e.g. ``fwsvd+axis=output@uniform:0.8``, ``svd-llm@energy:0.6`` or ``asvd@uniform:0.8#propagate=original``; append
``>eora=R`` for an EoRA stage of rank R after it (``svd-llm@uniform:0.6>eora=16``); ``dense`` needs no suffix. A
list-valued option takes ``/``-separated values (``modegpt+modules=qk/vo@uniform:0.8``; ``modules=mlp`` is a one-element
list). ``--save DIR`` also writes each compressed model as an lrc checkpoint DIR/<safe config name> (``safe_name``).

    python scripts/bench_quality.py --model smollm2 --jsonl docs/results/quality.jsonl --plot docs/quality.png
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LRC_SHARED", ROOT.parent / "shared"))
CALIB = SHARED / "data" / "calib" / "wiki_passages.jsonl"
WIKI = SHARED / "data" / "wikitext2" / "wikitext2_raw_test.jsonl"
METHODS = ["svd", "asvd", "fwsvd", "svd-llm", "lord", "lord+variant=weights"]
DEFAULT = ["dense"] + [f"{m}@uniform:{k}" for k in (0.8, 0.6) for m in METHODS] + \
          [f"svd-llm@{a}:{k}" for k in (0.8, 0.6) for a in ("energy", "welore", "loss")]


def _value(v: str):
    return float(v) if v.replace(".", "", 1).isdigit() else {"true": True, "false": False}.get(v, v)


def _values(pairs: list[str]) -> dict:
    """``KEY=VALUE`` items; ``A/B/C`` is a list (``modules=qk/vo``), and ``parse`` makes a single value of a
    list-typed method option a one-element list (``modules=mlp``)."""
    out = {}
    for o in pairs:
        k, v = o.split("=")
        out[k] = [_value(x) for x in v.split("/")] if "/" in v else _value(v)
    return out


def _listify(method: str, options: dict) -> dict:
    """Wrap scalar values of list-typed options of METHOD (from its config class) in a list."""
    import typing

    from compress.methods import get_method

    try:
        fields = get_method(method).config_cls.model_fields
    except KeyError:
        return options
    return {k: [v] if k in fields and typing.get_origin(fields[k].annotation) is list and not isinstance(v, list)
            else v for k, v in options.items()}


def safe_name(config: str) -> str:
    """A directory name for CONFIG (``modegpt+modules=qk/vo@uniform:0.8`` -> ``modegpt+modules=qk_vo_uniform_0.8``)."""
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", config)


def parse(config: str) -> dict:
    if config == "dense":
        return {"method": "dense", "options": {}, "allocator": None, "kept": 1.0, "engine": {}}
    config, _, engine = config.partition("#")
    config, _, eora = config.partition(">")
    head, kept = config.rsplit(":", 1)
    head, allocator = head.split("@") if "@" in head else (head, "uniform")
    method, *opts = head.split("+")
    return {"method": method, "options": _values(opts), "allocator": allocator, "kept": float(kept),
            "engine": _values(engine.split(",") if engine else []),
            "eora_rank": int(eora.split("=")[1]) if eora else None}


def one(model_spec: str, config: str, samples: int, seq_len: int, windows: int, cache: str,
        save: Path | None = None) -> dict:
    import torch

    from compress import compress_model
    from compress.api import save as save_checkpoint
    from compress.eval.perplexity import perplexity
    from compress.models import load_model
    from compress.recipe import parse_recipe
    from compress.report import peak_rss_gib

    torch.set_num_threads(int(os.environ.get("LRC_THREADS", "2")))
    c = parse(config)
    c["options"] = _listify(c["method"], c["options"])
    model, tok, _ = load_model(model_spec)
    out = {"config": config, "model": model_spec, **c, "calibration": f"{samples}x{seq_len}"}
    if c["method"] != "dense":
        recipe = parse_recipe({"calibration": {"dataset": str(CALIB), "samples": samples, "seq_len": seq_len},
                               "engine": {"device": "cpu", "batch_size": 8, **c["engine"]},
                               "stages": [{"method": c["method"], "param_ratio": c["kept"], "options": c["options"],
                                           "allocator": c["allocator"]}] +
                                         ([{"method": "eora", "rank": c["eora_rank"]}] if c["eora_rank"] else [])})
        t = time.perf_counter()
        report = compress_model(model, recipe, tok, cache_dir=cache)
        out.update({"compress_seconds": round(time.perf_counter() - t, 1),
                    "kept_measured": report["targeted"]["kept_fraction_of_targeted"],
                    "params_after": report["targeted"]["params_after"],
                    "phase_seconds": report["phase_seconds"], "peak_rss_gib": peak_rss_gib()})
        if "kept_storage_fraction" in report["targeted"]:  # CoSpaDi: bytes differ from parameters (the masks)
            out["kept_storage"] = report["targeted"]["kept_storage_fraction"]
    text = "\n\n".join(json.loads(line)["text"] for line in WIKI.read_text().splitlines())
    res = perplexity(model, tok, text, seq_len=512, max_windows=windows, batch_size=4)
    out.update({"perplexity": res.perplexity, "eval_tokens": res.tokens})
    if save is not None and c["method"] != "dense":  # an lrc checkpoint, as `lrc compress` writes it
        report["model"] = model_spec
        out["checkpoint"] = str(save_checkpoint(model, tok, save / safe_name(config), report, overwrite=True))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    series: dict[str, list] = {}
    for r in rows:
        if r["method"] != "dense":
            head, _, eng = r["config"].partition("#")
            head, _, eora = head.partition(">")
            label = head.rsplit(":", 1)[0].replace("@uniform", "") + (f" + {eora}" if eora else "") + \
                (f" #{eng}" if eng else "")
            series.setdefault(label, []).append((r["kept_measured"], r["perplexity"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if dense:
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense {dense:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("kept fraction of decoder-block Linear parameters")
    ax.set_ylabel("WikiText-2 perplexity (512-token windows)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows: list[dict]) -> str:
    """The results as a markdown table, in the order they were measured."""
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    lines = ["| configuration | kept (measured) | perplexity | × dense | compress s | peak RSS GiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:  # a value the run did not measure (the dense row's time and RSS) shows as –, not as 0
        ratio = f"{r['perplexity'] / dense:.2f}" if dense else "–"
        secs = f"{r['compress_seconds']:.1f}" if "compress_seconds" in r else "–"
        rss = f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else "–"
        lines.append(f"| {r['config']} | {r.get('kept_measured', 1.0):.4f} | {r['perplexity']:,.2f} | {ratio} | "
                     f"{secs} | {rss} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--configs", nargs="*", default=DEFAULT)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "lrc"))
    ap.add_argument("--jsonl", type=Path, required=True)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--save", type=Path, metavar="DIR",
                    help="save each compressed model as an lrc checkpoint DIR/<config, made a safe name>")
    ap.add_argument("--markdown", action="store_true", help="print the --jsonl results as a table and exit")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.markdown:
        print(markdown([json.loads(line) for line in a.jsonl.read_text().splitlines()]))
        return
    if a.one:
        print("RESULT " + json.dumps(one(a.model, a.one, a.samples, a.seq_len, a.windows, a.cache, a.save)))
        return
    done = {json.loads(line)["config"] for line in a.jsonl.read_text().splitlines()} if a.jsonl.is_file() else set()
    for config in a.configs:
        if config in done:
            continue
        cmd = [sys.executable, __file__, "--model", a.model, "--samples", str(a.samples), "--seq-len",
               str(a.seq_len), "--windows", str(a.windows), "--cache", a.cache, "--jsonl", str(a.jsonl),
               "--one", config] + (["--save", str(a.save)] if a.save else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{config}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(line[7:])
        with a.jsonl.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{config:32s} ppl {r['perplexity']:12.2f}  kept {r.get('kept_measured', 1):.4f}  "
              f"{r.get('compress_seconds', 0):7.1f} s  {r.get('peak_rss_gib', 0):.2f} GiB", flush=True)
    if a.plot:
        rows = [json.loads(line) for line in a.jsonl.read_text().splitlines()]
        plot(rows, a.plot)


if __name__ == "__main__":
    main()
