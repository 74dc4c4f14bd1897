"""Self-generated calibration: lrc's sampler against the ``generate()`` loop it replaced (issue 13, goal 4).

In one process, on the same model, threads and calibration settings (the README's main job: SmolLM2-135M-Instruct,
``recipes/svd-llm.yaml``: 32 samples x 256 tokens, seed 0), timed back to back:

  * ``generate``: the previous implementation, transformers' ``generate`` in batches of the engine's batch size (8),
    ``do_sample=True, top_k=0, top_p=1``, ``min_new_tokens = max_new_tokens = seq_len - 1`` (EOS suppressed by
    ``min_new_tokens``; ``multinomial`` draws);
  * ``lrc``: ``compress.calibration.selfgen`` (all samples in one chunk, DynamicCache, only the last position through
    the head, exponential-race draws; EOS excluded);
  * ``floor``: one forward without cache over the ``lrc`` tokens (batches of 8): the multiply-adds every sampler needs
    at least (token by token a sampler does the same products with 1-row GEMMs per sequence and the cache reads).

Printed: seconds of each, the speed-up of ``lrc`` over ``generate`` and its ratio to the floor, tokens/s, and the
first words of two samples of each sampler (read them: a sampler can be fast and wrong). --jsonl appends one object.

    .venv/bin/python scripts/bench_selfgen.py                    # about 4 minutes here
    .venv/bin/python scripts/bench_selfgen.py --samples 8        # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_compress import busy_jiffies, other_cpu_share, revision  # noqa: E402

from compress.calibration import selfgen  # noqa: E402
from compress.models import load_model  # noqa: E402
from compress.recipe import load_recipe  # noqa: E402


def with_generate(model, tokenizer, samples: int, seq_len: int, seed: int, batch_size: int) -> torch.Tensor:
    """The sampler lrc used before issue 13 (transformers' generate, multinomial draws)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    out = []
    for i in range(0, samples, batch_size):
        n = min(batch_size, samples - i)
        prompt = torch.full((n, 1), start, dtype=torch.long)
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, top_p=1.0,
                             max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                             pad_token_id=tokenizer.eos_token_id)
        out.append(gen[:, :seq_len])
    return torch.cat(out)


@torch.inference_mode()
def floor(model, ids: torch.Tensor, batch_size: int) -> None:
    for s in range(0, ids.shape[0], batch_size):
        model(ids[s:s + batch_size], use_cache=False, logits_to_keep=1)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def markdown(rows: list[dict]) -> str:
    """docs/benchmarks.md's table (``scripts/render_tables.py``) from the --jsonl rows."""
    out = ["| model | samples × tokens | generate() | lrc selfgen | speed-up | floor (one forward) | lrc / floor |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['samples']} × {r['seq_len']} | {r['generate_s']:.1f} s | {r['lrc_s']:.1f} s | "
                   f"{r['speedup']:.2f}× | {r['floor_forward_s']:.1f} s | {r['lrc_over_floor']:.2f}× |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "svd-llm.yaml"))
    ap.add_argument("--samples", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jsonl", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    cfg = recipe.calibration.model_copy(update={"samples": args.samples or recipe.calibration.samples,
                                                "dataset": "selfgen"})
    model, tokenizer, _ = load_model(args.model, recipe.model.dtype)
    batch = recipe.engine.batch_size
    busy, cpu, wall0 = busy_jiffies(), time.process_time(), time.perf_counter()
    old, t_old = timed(lambda: with_generate(model, tokenizer, cfg.samples, cfg.seq_len, cfg.seed, batch))
    new, t_new = timed(lambda: selfgen(model, tokenizer, cfg, batch))
    _, t_floor = timed(lambda: floor(model, new, batch))
    share = other_cpu_share(busy_jiffies() - busy, time.process_time() - cpu, time.perf_counter() - wall0)
    tokens = cfg.samples * (cfg.seq_len - 1)
    row = {"model": args.model, "samples": cfg.samples, "seq_len": cfg.seq_len, "threads": args.threads,
           "generate_s": t_old, "lrc_s": t_new, "floor_forward_s": t_floor, "speedup": t_old / t_new,
           "lrc_over_floor": t_new / t_floor, "lrc_tokens_per_s": tokens / t_new,
           "generate_tokens_per_s": tokens / t_old, "other_cpu_share": share, "revision": revision(),
           "eos_in_lrc_samples": int((new[:, 1:] == tokenizer.eos_token_id).sum())}
    print(f"{args.model}: {cfg.samples} samples x {cfg.seq_len} tokens, {args.threads} threads "
          f"(other processes used {share:.0%} of the CPU)")
    print(f"  generate (before)   {t_old:8.1f} s  {row['generate_tokens_per_s']:7.1f} tokens/s")
    print(f"  lrc selfgen         {t_new:8.1f} s  {row['lrc_tokens_per_s']:7.1f} tokens/s  "
          f"speed-up {row['speedup']:.2f}x")
    print(f"  floor (one forward) {t_floor:8.1f} s  lrc / floor {row['lrc_over_floor']:.2f}x")
    for name, ids in (("generate", old), ("lrc", new)):
        for k in range(2):
            text = tokenizer.decode(ids[k, 1:40]).replace("\n", " ")
            print(f"  {name} sample {k}: {text!r}")
    if args.jsonl:
        with args.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
