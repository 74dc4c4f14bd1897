"""Speed of compressed SmolLM2-135M-Instruct against dense on this machine, with ``lrc bench``'s protocol (issue 13,
goal 3: at least 0.9x the FLOP-ideal speed-up, prefill and decode; not a test).

Per configuration (``svd-llm:0.8`` = SVD-LLM keeping 80% of the targeted parameters, ``modegpt:0.8``...) the
checkpoint is taken from --checkpoints (``NAME=DIR``), else from the first existing default location, else made with
``lrc compress smollm2 --recipe recipes/<method>.yaml --calib selfgen`` (a recipe copy with the kept ratio, under
OUT/recipes; a few minutes for SVD-LLM, longer for MoDeGPT). Speed does not depend on the calibration data: uniform
allocations fix every shape from the ratio.

In one process, interleaved (``compress/eval/bench.py``: pinned threads, one warm-up each, --repeats rounds whose
order rotates, ratio per round), the roles

- ``dense``: the reference, ``compress.models.load_model("smollm2")``;
- ``no-linears``: dense with every decoder-block Linear's product replaced by zeros of its output shape: the time of
  the rest of the forward (attention scores, norms, RoPE, the head, generate's loop), from which the *attainable*
  speed-up follows (Amdahl: the block Linears' share of dense time shrinks by their multiply-add ratio, dense /
  model, and the rest, the head included, stays);
- ``fast``: the checkpoint as it loads (lrc's execution fast path: ``compress/checkpoint/lrc_fast.py``);
- ``nofuse``: the same without fusing the modules that share an input (``set_fast_path(fuse=False)``);
- ``plain``: the same without any fast path (``set_fast_path(fast=False, layout=False)``: factors called as
  modules, row-major; the forward before the fast path);
- ``dense-layout`` (--layout-reference): dense with the block Linears that have more outputs than inputs stored
  column-major, the layout the fast path gives low-rank factors: how much of a gain is layout, which dense could have
  too (the speed-ups above are all against plain ``dense``).

Printed: a table per configuration, prefill (128, 512 tokens) and decode (batch 1, 8) speed-up of each role over
dense as median [min-max] over the rounds, the FLOP-ideal (executed Linear multiply-adds per token, dense / model) and
the fraction of it reached, and the median times. --jsonl gets one JSON object per configuration and role, with the
raw times, the load average and ``other_cpu_share`` (the share of the machine's CPU time other processes used while
the configuration was measured; above 10% the timing is not this process's alone).

    .venv/bin/python scripts/bench_speed.py                                   # svd-llm 0.8 and 0.6
    .venv/bin/python scripts/bench_speed.py --configs svd-llm:0.8 modegpt:0.8 --layout-reference
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compress import CONTENDED, busy_jiffies, other_cpu_share, revision  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LRC = str(Path(sys.executable).with_name("lrc"))
DEFAULTS = {  # checkpoints earlier benchmarks left, tried in order
    "svd-llm:0.8": ["out/bench-speed/svd-llm-80", "out/smollm2-svd-llm-80",
                    "out/bench-modegpt/checkpoints/svd-llm_uniform_0.8"],
    "svd-llm:0.6": ["out/bench-speed/svd-llm-60", "out/bench-modegpt/checkpoints/svd-llm_uniform_0.6"],
    "modegpt:0.8": ["out/bench-speed/modegpt-80", "out/bench-modegpt/checkpoints/modegpt_uniform_0.8"],
}


def checkpoint(config: str, given: dict, out: Path) -> Path:
    """The checkpoint of ``config`` (``method:kept``): given, found, or compressed now."""
    if config in given:
        return Path(given[config])
    for path in DEFAULTS.get(config, []):
        if (ROOT / path / "config.json").is_file():
            return ROOT / path
    import yaml

    method, kept = config.split(":")
    recipe = yaml.safe_load((ROOT / "recipes" / f"{method}.yaml").read_text())
    recipe["stages"][0]["param_ratio"] = float(kept)
    recipe["stages"][0].pop("allocator", None)  # uniform: shapes follow the ratio alone
    recipe["stages"][0].pop("allocator_options", None)
    path = out / "recipes" / f"{method}-{round(float(kept) * 100)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    target = out / f"{method}-{round(float(kept) * 100)}"
    subprocess.run([LRC, "compress", "smollm2", "--recipe", str(path), "--calib", "selfgen", "--out", str(target),
                    "--overwrite"], check=True)
    return target


def dense_layout(model):
    """``model`` with its decoder-block Linears laid out as the fast path lays out low-rank factors."""
    from compress.checkpoint.lrc_fast import prefer_layout
    from compress.plan import find_blocks

    for block in find_blocks(model)[1]:
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                prefer_layout(m)
    return model


class _Free(torch.nn.Module):
    """A Linear whose product costs nothing: zeros of the output shape (for the attainable speed-up)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def without_linears(model):
    """``model`` with every decoder-block Linear replaced by ``_Free``: what the rest of the forward costs."""
    from compress.plan import find_blocks

    for block in find_blocks(model)[1]:
        for name, m in list(block.named_modules()):
            if isinstance(m, torch.nn.Linear):
                owner, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(owner) if owner else block, leaf, _Free(m.out_features))
    return model


def attainable(t_dense: float, t_rest: float, block_ratio: float) -> float:
    """The speed-up when the block Linears' time shrinks by ``block_ratio`` (their multiply-adds, dense / model) and
    the rest of the forward, the head included, stays (Amdahl)."""
    return t_dense / (t_rest + (t_dense - t_rest) / block_ratio)


def add_attainable(rows: list[dict]) -> None:
    """Attainable speed-ups of every compressed role from the dense and no-linears medians of the same run."""
    by_role = {r["role"]: r for r in rows}
    t = {k: _median(v) for k, v in by_role["dense"]["times_s"].items()}
    rest = {k: _median(v) for k, v in by_role["no-linears"]["times_s"].items()}
    head = by_role["dense"]["head_macs_per_token"]
    for row in rows:
        if row["role"] in ("dense", "no-linears"):
            continue
        ratio = (by_role["dense"]["linear_macs_per_token"] - head) / (row["linear_macs_per_token"] - head)
        row["block_linear_ideal"] = ratio
        row["attainable_speedup"] = {k: attainable(t[k], rest[k], ratio) for k in t}
        row["fraction_of_attainable"] = {k: row["measured_speedup"][k] / row["attainable_speedup"][k] for k in t}


def roles(config: str, path: Path, dense, layout_reference: bool) -> dict:
    from compress.checkpoint.modeling_lrc import set_fast_path
    from compress.models import load_model

    models = {"dense": dense, "no-linears": without_linears(load_model("smollm2")[0])}
    if layout_reference:
        models["dense-layout"] = dense_layout(load_model("smollm2")[0])
    models["fast"] = load_model(str(path))[0]
    models["nofuse"] = set_fast_path(load_model(str(path))[0], fuse=False)
    models["plain"] = set_fast_path(load_model(str(path))[0], fast=False, layout=False)
    return models


def run(config: str, path: Path, dense, args) -> list[dict]:
    from compress.eval.bench import describe, measure_side_by_side, speedups

    models = roles(config, path, dense, args.layout_reference)
    load, busy, cpu, wall = os.getloadavg(), busy_jiffies(), time.process_time(), time.perf_counter()
    speeds, ratios = measure_side_by_side(models, args.seq_lens, args.decode_batches, args.decode_tokens,
                                          args.repeats)
    wall = time.perf_counter() - wall
    share = other_cpu_share(busy_jiffies() - busy, time.process_time() - cpu, wall)
    ref = describe(dense, None)
    rows = []
    for role, model in models.items():
        row = {"config": config, "role": role, "checkpoint": str(path), "threads": torch.get_num_threads(),
               "repeats": args.repeats, "decode_tokens": args.decode_tokens, "revision": revision(),
               "loadavg_before": load, "other_cpu_share": share, "wall_s": wall,
               "linear_macs_per_token": describe(model, None)["linear_macs_per_token"],
               "head_macs_per_token": model.get_output_embeddings().weight.numel(),
               "times_s": speeds[role]["times_s"]}
        if role not in ("dense", "no-linears"):
            row.update(speedups(ref, describe(model, None), ratios[role]))
        rows.append(row)
    add_attainable(rows)
    return rows


def table(rows: list[dict]) -> str:
    lines, keys = [], list(rows[0]["times_s"])  # prefill@128, prefill@512, decode@b1, decode@b8
    for row in rows:
        if row["role"] == "dense":
            flag = "  CONTENDED" if row["other_cpu_share"] >= CONTENDED else ""
            lines.append(f"\n{row['config']} ({row['checkpoint']}; {row['threads']} threads, {row['repeats']} rounds, "
                         f"load {row['loadavg_before'][0]:.2f}, other CPU {row['other_cpu_share']:.0%}{flag})")
            lines.append(f"  {'role':13s}{'ideal':>7s}" + "".join(f"{k:>27s}" for k in keys))
            lines.append(f"  {'dense (ms)':13s}{'':>7s}" + "".join(f"{1e3 * _median(row['times_s'][k]):>27.1f}"
                                                                     for k in keys))
            continue
        if row["role"] == "no-linears":
            lines.append(f"  {'no-lin. (ms)':13s}{'':>7s}" + "".join(f"{1e3 * _median(row['times_s'][k]):>27.1f}"
                                                                       for k in keys))
            continue
        cells = []
        for k in keys:
            s = row["speedup_spread"][k]
            cells.append(f"{s['median']:.3f} [{s['min']:.2f}-{s['max']:.2f}] {row['fraction_of_ideal'][k]:4.0%}")
        lines.append(f"  {row['role']:13s}{row['flop_ideal_speedup']:7.3f}" + "".join(f"{c:>27s}" for c in cells))
        lines.append(f"  {'  attainable':13s}{'':7s}" + "".join(
            f"{row['attainable_speedup'][k]:.3f} ({row['fraction_of_attainable'][k]:.0%} reached)".rjust(27)
            for k in keys))
    lines.append("\ncells: speed-up over dense, median [min-max] over the rounds, and the median's fraction of the "
                 "FLOP-ideal (ideal: dense / model Linear multiply-adds per token, head included). attainable: the "
                 "speed-up if the block Linears' time shrank by their multiply-add ratio and the rest of the forward "
                 "(no-linears: dense with every block Linear's product replaced by zeros; the head is in it) stayed; "
                 "the share of it the median reached.")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """docs/benchmarks.md's speed table (``scripts/render_tables.py``) from the --jsonl rows of the latest run of
    each configuration."""
    latest: dict = {}
    for row in rows:
        latest.setdefault(row["config"], {})[row["role"]] = row
    keys = list(next(iter(latest.values()))["dense"]["times_s"])
    out = ["| config | role | FLOP-ideal | " + " | ".join(keys) + " |", "|---|---|---:|" + "---:|" * len(keys)]
    for config, by_role in latest.items():
        for role in ("dense", "no-linears"):
            out.append(f"| {config} | {role} (ms) | | " + " | ".join(
                f"{1e3 * _median(by_role[role]['times_s'][k]):.1f}" for k in keys) + " |")
        for role, row in by_role.items():
            if role in ("dense", "no-linears"):
                continue
            cells = []
            for k in keys:
                s = row["speedup_spread"][k]
                cells.append(f"{s['median']:.3f}× [{s['min']:.2f}–{s['max']:.2f}], {row['fraction_of_ideal'][k]:.0%} / "
                             f"{row['fraction_of_attainable'][k]:.0%}")
            out.append(f"| {config} | {role} | {row['flop_ideal_speedup']:.3f}× | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["svd-llm:0.8", "svd-llm:0.6"])
    ap.add_argument("--checkpoints", nargs="*", default=[], metavar="CONFIG=DIR")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-speed")
    ap.add_argument("--jsonl", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512])
    ap.add_argument("--decode-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--layout-reference", action="store_true", help="also time dense with the factors' layout")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    given = dict(c.split("=", 1) for c in args.checkpoints)
    paths = {c: checkpoint(c, given, args.out) for c in args.configs}  # compress first: timing runs come after

    from compress.models import load_model

    dense = load_model("smollm2")[0]
    for config, path in paths.items():
        rows = run(config, path, dense, args)
        print(table(rows), flush=True)
        if args.jsonl:
            with args.jsonl.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
