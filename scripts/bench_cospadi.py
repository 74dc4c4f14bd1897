"""CoSpaDi's cost and convergence (the CoSpaDi issue's benchmark; not a test). Two measurements:

``--curve``: the quality-vs-rounds curve on real statistics. SmolLM2-135M-Instruct, bench_quality's calibration
(64 x 512 tokens of ../shared/data/calib/wiki_passages.jsonl, seed 0); CoSpaDi at --kept of storage on the seven
Linears of one block (--layer, the others left dense), T = --rounds, one run per OMP setting (--per-step, 1 = OMP
exactly). Each round's whitened relative error ‖W_L − D C‖/‖W_L‖ and the cumulative OMP and atom-update seconds come
from lrc's report rows (``whitened_errors``, ``seconds_omp``, ``seconds_update``); the per-round cost is their sum
over the block divided by the rounds run. One JSON line per (matrix, setting) in --jsonl.

``--large``: one random whitened 4096 x 11008 matrix (a LLaMA-7B MLP shape, torch layout out x in = 11008 x 4096 for
up/gate) at 0.8 of storage (Eq. 10, 16-bit values: k = 3506, s = 1753). A full round does not fit this machine's
time, so the OMP is timed on --columns of the 11008 columns and the K-SVD update on --atoms of the k atoms (each
column's OMP and each atom's update cost the same work up to the data), and both are scaled to the full matrix:
seconds per round = omp_s · 11008 / columns + residual_s + update_s · k / atoms (update_s: the sampled atoms'
updates without the one residual product a round needs). Fixed seed; fp32; 2 threads.

    .venv/bin/python scripts/bench_cospadi.py --curve --rounds 60 --per-step 16 --jsonl docs/results/cospadi-curve.jsonl
    .venv/bin/python scripts/bench_cospadi.py --curve --rounds 5 --per-step 1 --jsonl docs/results/cospadi-curve.jsonl
    .venv/bin/python scripts/bench_cospadi.py --large --jsonl docs/results/cospadi-large.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402
from bench_compress import revision  # noqa: E402


def curve(a) -> None:
    import torch

    from compress import api
    from compress.models import load_model
    from compress.recipe import parse_recipe

    torch.set_num_threads(a.threads)
    model, tok, _ = load_model(a.model)
    recipe = parse_recipe({
        "calibration": {"dataset": str(bq.CALIB), "samples": 64, "seq_len": 512, "seed": 0},
        "engine": {"device": "cpu"},
        "stages": [{"method": a.method, "param_ratio": a.kept, "targets": [rf"layers\.{a.layer}\."],
                    "options": {"iterations": a.rounds, "omp_atoms_per_step": a.per_step}
                    if a.method == "cospadi" else {}}]})
    t0 = time.perf_counter()
    report = api.compress_model(model, recipe, tok, progress=False)
    wall = time.perf_counter() - t0
    if a.method != "cospadi":  # the low-rank baseline at the same kept fraction: its error per matrix
        with open(a.jsonl, "a") as f:
            for r in report["modules"]:
                f.write(json.dumps({"bench": "curve", "method": a.method, "model": a.model, "layer": a.layer,
                                    "kept_storage": a.kept, "matrix": r["name"], "rank": r["rank"],
                                    "rel_error": r["rel_error"], "revision": revision()}) + "\n")
        return
    with open(a.jsonl, "a") as f:
        for r in report["modules"]:
            f.write(json.dumps({
                "bench": "curve", "model": a.model, "layer": a.layer, "kept_storage": a.kept, "matrix": r["name"],
                "shape": [r["out_features"], r["in_features"]], "atoms": r["rank"], "nnz": r["rank"] // 2,
                "omp_atoms_per_step": a.per_step, "rounds": r["rounds"], "whitened_errors": r["whitened_errors"],
                "rel_error": r["rel_error"], "seconds_omp": r["seconds_omp"], "seconds_update": r["seconds_update"],
                "run_wall_s": round(wall, 1), "threads": a.threads, "revision": revision(),
                "torch": torch.__version__}) + "\n")
    omp = sum(r["seconds_omp"] for r in report["modules"])
    upd = sum(r["seconds_update"] for r in report["modules"])
    rounds = report["modules"][0]["rounds"]
    print(f"layer {a.layer}, per_step {a.per_step}: {rounds} rounds, per round OMP {omp / rounds:.2f} s + "
          f"update {upd / rounds:.2f} s; run {wall:.0f} s")
    for r in report["modules"]:
        e = r["whitened_errors"]
        marks = {t: e[t - 1] for t in (1, 5, 15, 60) if t <= len(e)}
        print(f"  {r['name']:40s} " + "  ".join(f"T={t}: {v:.4f}" for t, v in marks.items()))


def large(a) -> None:
    import torch

    from compress.methods.cospadi import math as DL

    torch.set_num_threads(a.threads)
    m, n = 11008, 4096
    k, s = DL.dict_size(m, n, 0.8, value_bits=16)
    g = torch.Generator().manual_seed(0)
    WL = torch.randn(n, m, generator=g) * torch.linspace(0.1, 2.0, n).unsqueeze(1)  # a whitened weight, n x m
    D = DL.init_dictionary(WL, k)
    t0 = time.perf_counter()
    G = D.T @ D
    t_gram = time.perf_counter() - t0
    cols = WL[:, : a.columns]
    t0 = time.perf_counter()
    index, coef = DL.batch_omp(G, D.T @ cols, s, per_step=a.per_step)
    t_omp = time.perf_counter() - t0
    # the atom update on the first --atoms atoms, with the codes of the coded columns spread over all m signals as
    # the real round would have them (|J| ≈ m·s/k signals per atom)
    reps = -(-m // a.columns)
    full_index = index.repeat(reps, 1)[:m]
    full_coef = coef.repeat(reps, 1)[:m].contiguous()
    t0 = time.perf_counter()
    DL.ksvd_update(WL, D.clone(), full_index, full_coef.clone(), 8, atoms=0)  # the residual E = WL − D C alone
    t_res = time.perf_counter() - t0
    t0 = time.perf_counter()
    DL.ksvd_update(WL, D.clone(), full_index, full_coef, 8, atoms=a.atoms)
    t_upd = time.perf_counter() - t0 - t_res
    row = {"bench": "large", "shape_out_in": [m, n], "atoms": k, "nnz": s, "omp_atoms_per_step": a.per_step,
           "columns_timed": a.columns, "atoms_timed": a.atoms, "omp_s": round(t_omp, 2), "update_s": round(t_upd, 2),
           "gram_s": round(t_gram, 2), "residual_s": round(t_res, 2),
           "omp_s_per_round": round(t_omp * m / a.columns, 1),
           "update_s_per_round": round(t_res + t_upd * k / a.atoms, 1), "threads": a.threads, "revision": revision(),
           "torch": torch.__version__}
    row["round_s"] = round(row["omp_s_per_round"] + row["update_s_per_round"] + t_gram, 1)
    with open(a.jsonl, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def markdown_curve(rows: list[dict]) -> str:
    """Per matrix of the measured block: the whitened error after T rounds for each OMP setting, and per-round cost."""
    marks = (1, 2, 5, 15, 60)
    base = {r["matrix"]: r for r in rows if r.get("method", "cospadi") != "cospadi"}
    rows = [r for r in rows if r.get("method", "cospadi") == "cospadi"]
    settings = sorted({r["omp_atoms_per_step"] for r in rows})
    head = ["| matrix | out × in | k / s |"] + [f" OMP×{p} T={t} |" for p in settings for t in marks] + \
        [" svd-llm (rank) |"]
    lines = ["".join(head), "|---|---|---|" + "---:|" * (len(settings) * len(marks) + 1)]
    by = {(r["matrix"], r["omp_atoms_per_step"]): r for r in rows}
    for name in dict.fromkeys(r["matrix"] for r in rows):
        first = next(r for r in rows if r["matrix"] == name)
        cells = [f"| {name.split('layers.')[-1]} | {first['shape'][0]} × {first['shape'][1]} | "
                 f"{first['atoms']} / {first['nnz']} |"]
        for p in settings:
            e = by.get((name, p), {}).get("whitened_errors", [])
            cells += [f" {e[t - 1]:.4f} |" if t <= len(e) else " – |" for t in marks]
        b = base.get(name)
        cells.append(f" {b['rel_error']:.4f} ({b['rank']}) |" if b else " – |")
        lines.append("".join(cells))
    lines += ["", "| OMP setting | rounds run | OMP s / round | atom update s / round | total s / round (block) |",
              "|---|---:|---:|---:|---:|"]
    for p in settings:
        sel = [r for r in rows if r["omp_atoms_per_step"] == p]
        rounds = sel[0]["rounds"]
        omp = sum(r["seconds_omp"] for r in sel) / rounds
        upd = sum(r["seconds_update"] for r in sel) / rounds
        label = "OMP (1 atom per step, exact)" if p == 1 else f"generalised OMP, {p} atoms per step"
        lines.append(f"| {label} | {rounds} | {omp:.2f} | {upd:.2f} | {omp + upd:.2f} |")
    return "\n".join(lines)


def markdown_large(rows: list[dict]) -> str:
    lines = ["| matrix (out × in) | k / s | OMP setting | columns / atoms timed | OMP s / round | atom update s / "
             "round | one round s |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        m, n = r["shape_out_in"]
        lines.append(f"| {m} × {n} | {r['atoms']} / {r['nnz']} | {r['omp_atoms_per_step']} per step | "
                     f"{r['columns_timed']} / {r['atoms_timed']} | {r['omp_s_per_round']:.0f} | "
                     f"{r['update_s_per_round']:.0f} | {r['round_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--curve", action="store_true")
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="cospadi", help="--curve: cospadi, or svd-llm for its error per matrix")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--kept", type=float, default=0.8)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--per-step", type=int, default=16)
    ap.add_argument("--columns", type=int, default=256)
    ap.add_argument("--atoms", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LRC_THREADS", "2")))
    ap.add_argument("--jsonl", type=Path, required=True)
    a = ap.parse_args()
    if a.curve:
        curve(a)
    if a.large:
        large(a)


if __name__ == "__main__":
    main()
