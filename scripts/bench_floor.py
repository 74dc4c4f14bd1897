"""How close lrc's compression is to the compute floor (issue 13, goal 1), measured in one process.

The floor is what the physics of the method needs, timed here with plain torch on the same model, calibration tokens
and threads, with no lrc machinery:
  * forward: one pass of the calibration tokens through every decoder block (batches of the recipe's batch size);
  * Grams: ``XᵀX`` of every distinct Linear input over all tokens (fp32 products, fp64 sum, as lrc accumulates);
  * decompositions: what SVD-LLM needs at its cheapest sizes, fp64: for an m×n weight with m ≤ n the output Gram
    ``W H Wᵀ``, its eigh (m×m) and the factor ``U_rᵀ W``; with m > n one eigh of H (n×n) per shared input, then
    ``Sᵀ Wᵀ W S``, its eigh (n×n), ``U_r = W S V_r Σ_r⁻¹`` and ``U_rᵀ W`` (r: the recipe's ratio, rank formula).
The sequential scheme (q,k,v → o → gate,up → down, each group's statistics from the block as compressed so far)
needs more forward work by construction: each group's statistics pass runs the block up to that group's input, and
the outputs come from one more full pass. Its floor replaces "forward" by those prefix passes, timed the same way.

Then lrc compresses the same model with the same recipe in this process, and the ratios are printed with the raw
times and lrc's own per-phase profile (report ``block_phase_seconds``):

    python scripts/bench_floor.py                                   # the README's main job (svd-llm 0.8, selfgen)
    python scripts/bench_floor.py --one-pass                        # sequential: false, propagate: original
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress.api import compress_model, with_overrides  # noqa: E402
from compress.calibration import calibration_tokens  # noqa: E402
from compress.engine.capture import StopForward, capture_block_inputs  # noqa: E402
from compress.engine.lockstep import enabled as lockstep_enabled  # noqa: E402
from compress.linalg import rank_for_ratio  # noqa: E402
from compress.models import cache_root, load_model  # noqa: E402
from compress.plan import find_blocks, linear_units  # noqa: E402
from compress.recipe import load_recipe  # noqa: E402


def _inputs(block):
    """Pre-hooks that keep every Linear's input per batch; Linears fed the same tensor share one list."""
    seen: dict[str, list] = {}
    handles = []
    for name, mod in linear_units(block):
        def hook(m, args, n=name):
            seen.setdefault(n, []).append(args[0])
        handles.append(mod.register_forward_pre_hook(hook))
    return seen, handles


def _groups(seen: dict[str, list]) -> list[list[str]]:
    groups: list[list[str]] = []
    for name, xs in seen.items():
        home = next((g for g in groups if seen[g[0]][0] is xs[0]), None)
        (home.append(name) if home else groups.append([name]))
    return groups


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


@torch.no_grad()
def _prefix_passes(block, x, kwargs, batch: int, groups: list[list[str]]) -> float:
    """Time of the sequential scheme's statistics passes: for each group, the block run until that group's first
    module is called (no statistics, no decomposition: only the forward work the scheme cannot avoid)."""
    mods = dict(block.named_modules())
    total = 0.0
    for g in groups:
        def stop(m, args):
            raise StopForward
        h = mods[g[0]].register_forward_pre_hook(stop)
        t = time.perf_counter()
        for s in range(0, x.shape[0], batch):
            try:
                block(x[s: s + batch], **kwargs)
            except StopForward:
                pass
        total += time.perf_counter() - t
        h.remove()
    return total


@torch.no_grad()
def floor(model, ids: torch.Tensor, batch: int, sequential: bool, ratio: float) -> dict:
    _, blocks = find_blocks(model)
    x = torch.empty(ids.shape[0], ids.shape[1], model.config.hidden_size)
    kw = capture_block_inputs(model, blocks, ids, x, batch, "cpu")
    t = dict(forward=0.0, grams=0.0, decompositions=0.0, sequential_prefixes=0.0)
    for i, block in enumerate(blocks):
        seen, handles = _inputs(block)
        y = torch.empty_like(x)

        def fwd():
            for s in range(0, x.shape[0], batch):
                out = block(x[s: s + batch], **kw[i])
                y[s: s + batch] = out[0] if isinstance(out, (tuple, list)) else out
        _, dt = _timed(fwd)
        t["forward"] += dt
        for h in handles:
            h.remove()
        groups = _groups(seen)
        if sequential:
            t["sequential_prefixes"] += _prefix_passes(block, x, kw[i], batch, groups)
        grams, dt = _timed(lambda: {g[0]: sum((xb.reshape(-1, xb.shape[-1]).T @ xb.reshape(-1, xb.shape[-1])).double()
                                              for xb in seen[g[0]]) for g in groups})
        t["grams"] += dt
        mods = dict(linear_units(block))

        def decompose():
            for g in groups:
                H, root = grams[g[0]], None
                for name in g:
                    W = mods[name].weight.double()
                    m, n = W.shape
                    r = rank_for_ratio(m, n, ratio)
                    if m <= n:
                        _, U = torch.linalg.eigh(W @ H @ W.T)
                        U = U[:, -r:]
                    else:
                        if root is None:
                            lam, Q = torch.linalg.eigh(H)
                            root = Q * lam.clamp_min(0).sqrt()
                        WS = W @ root
                        lam, V = torch.linalg.eigh(WS.T @ WS)
                        U = (WS @ V[:, -r:]) / lam[-r:].clamp_min(1e-300).sqrt()
                    U.T @ W
        _, dt = _timed(decompose)
        t["decompositions"] += dt
        x = y
    return {k: round(v, 2) for k, v in t.items()}


def _spread(r: dict) -> str:
    """`` [lo–hi] (median of n)`` where the row holds several runs; nothing for a single run."""
    if r.get("repeats", 1) < 2:
        return " (1 run)"
    lo, hi = r["ratio_range"]
    return f" [{lo:.2f}–{hi:.2f}] (median of {r['repeats']})"


def markdown(rows: list[dict]) -> str:
    """One row per measured setting: the floor's parts, lrc's block loop and its phases, the ratios."""
    lines = ["| setting | forward | Grams | decompositions | floor | lrc blocks | lrc / floor | sequential prefixes | "
             "lrc / sequential floor | lrc phases (load / statistics / decompose / propagate / save) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        f, ph = r["floor"], r["lrc_block_phases"]
        phases = " / ".join(f"{ph.get(k, 0):.1f}" for k in ("load", "statistics", "decompose", "propagate", "save"))
        seq = (f"{f['sequential_prefixes']:.1f} s | {r['ratio_to_sequential_floor']:.2f}×"
               if "floor_sequential_s" in r else "– | –")
        lines.append(f"| {r['setting']} ({r['model']}, {r['tokens']} tokens) | {f['forward']:.1f} s | {f['grams']:.1f} s | "
                     f"{f['decompositions']:.1f} s | {r['floor_one_forward_s']:.1f} s | {r['lrc_blocks_s']:.1f} s | "
                     f"**{r['ratio_to_one_forward_floor']:.2f}×**{_spread(r)} | {seq} | {phases} s |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "svd-llm.yaml"))
    p.add_argument("--calib", default="selfgen")
    p.add_argument("--one-pass", action="store_true", help="sequential: false, propagate: original")
    p.add_argument("--repeats", type=int, default=3, help="floor and lrc timed this many times, alternating; the "
                                                          "row reports the median ratio and its range")
    p.add_argument("--jsonl", type=Path)
    a = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    recipe = with_overrides(load_recipe(a.recipe), a.recipe, calibration__dataset=a.calib, engine__device="cpu")
    if a.one_pass:
        recipe = with_overrides(recipe, a.recipe, engine__sequential=False, engine__propagate="original")
    model, tok, _ = load_model(a.model, recipe.model.dtype)
    ids = calibration_tokens(model, tok, recipe.calibration, cache_root(), recipe.engine.batch_size)
    sequential = recipe.engine.sequential
    runs = []
    for rep in range(a.repeats):  # floor, then lrc, alternating: a slow spell of the machine hits both
        fl = floor(model, ids, recipe.engine.batch_size, sequential, recipe.stages[0].param_ratio)
        net = copy.deepcopy(model)
        with tempfile.TemporaryDirectory() as cache:
            os.environ.setdefault("LRC_CACHE", str(cache_root()))
            report = compress_model(net, recipe, tok, cache_dir=cache)
        del net
        base = fl["grams"] + fl["decompositions"]
        runs.append({"floor": fl, "floor_one": fl["forward"] + base,
                     "floor_seq": fl["forward"] + fl["sequential_prefixes"] + base,  # prefixes, then the full pass
                     "blocks": report["phase_seconds"]["blocks"], "phases": report["block_phase_seconds"]})
        print(f"run {rep + 1}/{a.repeats}: lrc blocks {runs[-1]['blocks']:.1f} s, floor {runs[-1]['floor_one']:.1f} s "
              f"({runs[-1]['blocks'] / runs[-1]['floor_one']:.2f}x); decompose {report['block_phase_seconds']['decompose']:.1f} s "
              f"against {fl['decompositions']:.1f} s", file=sys.stderr)
    ratios = sorted(r["blocks"] / r["floor_one"] for r in runs)
    mid = sorted(runs, key=lambda r: r["blocks"] / r["floor_one"])[len(runs) // 2]  # the median run's figures
    setting = "one-pass" if a.one_pass else "default"
    if sequential and not lockstep_enabled():
        setting += " (prefix passes)"
    res = {"bench": "floor", "model": a.model, "setting": setting,
           "tokens": int(ids.numel()), "threads": torch.get_num_threads(), "floor": mid["floor"],
           "floor_one_forward_s": round(mid["floor_one"], 2), "lrc_blocks_s": round(mid["blocks"], 2),
           "lrc_block_phases": mid["phases"], "ratio_to_one_forward_floor": round(mid["blocks"] / mid["floor_one"], 3),
           "repeats": len(runs), "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)],
           "runs": [{"floor_one_forward_s": round(r["floor_one"], 2), "lrc_blocks_s": round(r["blocks"], 2),
                     "decompose_s": r["phases"]["decompose"], "floor_decompositions_s": r["floor"]["decompositions"]}
                    for r in runs],
           "load_average": round(os.getloadavg()[0], 2)}
    if sequential:
        res["floor_sequential_s"] = round(mid["floor_seq"], 2)
        res["ratio_to_sequential_floor"] = round(mid["blocks"] / mid["floor_seq"], 3)
    print(json.dumps(res, indent=2))
    if a.jsonl:
        with open(a.jsonl, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
