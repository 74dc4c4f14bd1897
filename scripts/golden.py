"""Fingerprints of compressed checkpoints, to prove a refactor changed no result by one byte.

For each case (a recipe on the real stories260k, or any checkpoint directory given with --dir) it prints the SHA-256
of ``model.safetensors``, ``config.json`` and of the report with its timing and path fields removed
(``lrc_report.json`` and ``lrc_modules.csv``); version strings other libraries stamp (``transformers_version``, the
report's torch and lm-eval versions) are left out: the lock (``requirements.lock``) pins those, and a pin change that
moves a weight or a number lrc writes still fails the check, until ``--write`` records the refresh. ``tests/test_golden.py`` compares the stories260k cases against
``tests/data/golden-stories260k.json`` (recorded from the code before the method protocol was generalised), and
``.ci/run`` compares the README's main job against ``docs/results/golden-main-job.json``.

Fingerprints are exact bits, so they belong to one kind of CPU as well as one lock: MKL and PyTorch pick their
kernels by the instruction set, and another CPU rounds some float operations differently (every weight moves in the
last bits; the configs stay identical). On a new CI machine, record them at the last landed commit (a worktree of it
on ``PYTHONPATH``), then check the new code against that record — what was done when CI moved on 2026-12-07.

    python scripts/golden.py --write tests/data/golden-stories260k.json     # record (stories260k cases)
    python scripts/golden.py --dir out/smollm2-modegpt-80                    # one checkpoint's fingerprint
    python scripts/golden.py --dir out/smollm2-modegpt-80 --check docs/results/golden-main-job.json
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

VOLATILE = {"seconds", "phase_seconds", "block_phase_seconds", "run_cache", "peak_rss_gib", "total_seconds", "eval_seconds", "model",
            "seconds_omp", "seconds_update",
            "checkpoint_bytes"}  # read off model.safetensors, which is hashed itself
# Version strings stamped by other libraries: what the lock pins (requirements.lock), not what lrc decides. A new
# transformers writes its own version into config.json although not one weight moves; the fingerprints leave these
# out, and a pin change that does move a byte lrc writes is caught by the weights, lrc's config or the report.
STAMPS = {"transformers_version", "torch", "lm_eval_version"}
CALIB = {"dataset": "selfgen", "samples": 16, "seq_len": 64}
CASES = {
    "svd-llm": {"stages": [{"method": "svd-llm", "param_ratio": 0.8}]},
    "svd-llm+eora": {"stages": [{"method": "svd-llm", "param_ratio": 0.6}, {"method": "eora", "rank": 4}]},
    "welore+svd-llm": {"stages": [{"method": "svd-llm", "param_ratio": 0.7, "allocator": "welore"}]},
    "loss+svd-llm": {"stages": [{"method": "svd-llm", "param_ratio": 0.7, "allocator": "loss"}]},
    "energy": {"stages": [{"method": "svd-llm", "energy": 0.9}]},
    "asvd": {"stages": [{"method": "asvd", "param_ratio": 0.8}]},
    "fwsvd": {"stages": [{"method": "fwsvd", "param_ratio": 0.8}]},
    "lord": {"stages": [{"method": "lord", "param_ratio": 0.8}]},
    "dense-objective": {"engine": {"objective": "dense"}, "stages": [{"method": "svd-llm", "param_ratio": 0.8}]},
    "original-propagation": {"engine": {"propagate": "original", "sequential": False},
                             "stages": [{"method": "svd", "param_ratio": 0.7, "align": 8}]},
    # recorded by issue 22 (methods that came after the protocol was generalised)
    "modegpt": {"stages": [{"method": "modegpt", "param_ratio": 0.75}]},
    "modegpt-influence": {"stages": [{"method": "modegpt", "param_ratio": 0.75, "allocator": "block_influence"}]},
    "cospadi": {"stages": [{"method": "cospadi", "param_ratio": 0.8, "options": {"iterations": 4}}]},
    "cospadi-shared": {"stages": [{"method": "cospadi", "param_ratio": 0.8,
                                   "options": {"iterations": 4, "share": "layers"}}]},
}


def _strip(obj, drop=VOLATILE | STAMPS):
    if isinstance(obj, dict):
        return {k: _strip(v, drop) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [_strip(v, drop) for v in obj]
    return obj


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(directory: Path) -> dict:
    """Hashes of the weights, the config and the report (timings, paths and other libraries' version stamps removed)
    of a checkpoint directory. The config is hashed as parsed JSON without ``transformers_version`` (every other key,
    lrc's section included, counts)."""
    out = {"model.safetensors": _sha((directory / "model.safetensors").read_bytes()),
           "config.json": _sha(json.dumps(_strip(json.loads((directory / "config.json").read_text()), STAMPS),
                                          sort_keys=True).encode())}
    report = directory / "lrc_report.json"
    if report.is_file():
        out["lrc_report.json"] = _sha(json.dumps(_strip(json.loads(report.read_text())), sort_keys=True).encode())
    table = directory / "lrc_modules.csv"
    if table.is_file():
        rows = list(csv.DictReader(io.StringIO(table.read_text())))
        out["lrc_modules.csv"] = _sha(json.dumps([{k: v for k, v in r.items() if k not in VOLATILE} for r in rows])
                                      .encode())
    return out


def run_cases(model: str, names: list[str]) -> dict:
    from compress import api
    from compress.recipe import parse_recipe

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            case = CASES[name]
            recipe = parse_recipe({"calibration": CALIB, "engine": {"device": "cpu", **case.get("engine", {})},
                                   "stages": case["stages"]}, name)
            out = Path(tmp) / name
            api.compress(model, recipe, out, cache_dir=Path(tmp) / "cache", progress=False)
            results[name] = fingerprint(out)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(os.environ.get("LRC_SHARED", Path(__file__).resolve().parents[2]
                                                                / "shared")) / "models" / "stories260k"))
    ap.add_argument("--dir", type=Path, help="fingerprint this checkpoint directory instead of running the cases")
    ap.add_argument("--write", type=Path, help="write the fingerprints here")
    ap.add_argument("--check", type=Path, help="compare with the fingerprints stored here; exit 1 on a difference")
    args = ap.parse_args()
    got = {"dir": fingerprint(args.dir)} if args.dir else run_cases(args.model, list(CASES))
    print(json.dumps(got, indent=2))
    if args.write:
        args.write.write_text(json.dumps(got, indent=2) + "\n")
    if args.check:
        want = json.loads(args.check.read_text())
        bad = [f"{case}/{f}" for case in want for f in want[case] if got.get(case, {}).get(f) != want[case][f]]
        if bad:
            print(f"changed: {', '.join(bad)}", file=sys.stderr)
            sys.exit(1)
        print("identical to " + str(args.check), file=sys.stderr)


if __name__ == "__main__":
    main()
