"""A model several times larger than the memory lrc needs to compress it (issue 13, goal 2).

Writes a random Llama shard by shard (one decoder block in memory at a time, never the whole model), then runs
``lrc compress`` on it in a fresh process with one-pass svd-llm (statistics and the next block's inputs from one
forward: ``sequential: false``, ``propagate: original``) on a few calibration windows, and reports the model's size
on disk, the checkpoint's, the wall time and the process's peak RSS (its report's ``peak_rss_gib``, Linux VmHWM,
which includes writing the checkpoint).

    python scripts/bench_scale.py                      # default: 190 blocks of width 1024, 8.06 GiB of fp32
    python scripts/bench_scale.py --layers 4 --keep    # a quick try
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LRC_SHARED", ROOT.parent / "shared"))


def block_tensors(i: int, a) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    head = a.hidden // a.heads
    shapes = {"self_attn.q_proj": (a.hidden, a.hidden), "self_attn.k_proj": (a.kv_heads * head, a.hidden),
              "self_attn.v_proj": (a.kv_heads * head, a.hidden), "self_attn.o_proj": (a.hidden, a.hidden),
              "mlp.gate_proj": (a.intermediate, a.hidden), "mlp.up_proj": (a.intermediate, a.hidden),
              "mlp.down_proj": (a.hidden, a.intermediate)}
    out = {f"model.layers.{i}.{k}.weight": torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(a.hidden)
    out[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(a.hidden)
    return out


def make_model(path: Path, a) -> int:
    """Config, tokenizer (stories260k's) and one safetensors shard per block; returns the bytes of weights."""
    from transformers import AutoTokenizer, LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                max_position_embeddings=1024, tie_word_embeddings=True).save_pretrained(path)
    AutoTokenizer.from_pretrained(SHARED / "models" / "stories260k").save_pretrained(path)
    n = a.layers + 1
    weight_map, total = {}, 0
    groups = [lambda: {"model.embed_tokens.weight": torch.randn(a.vocab, a.hidden,
                                                                generator=torch.Generator().manual_seed(0)) * 0.02,
                       "model.norm.weight": torch.ones(a.hidden)}]
    groups += [lambda i=i: block_tensors(i, a) for i in range(a.layers)]
    for k, make in enumerate(groups):
        tensors = make()
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"  wrote {name} ({total / 2**30:.2f} GiB so far)", flush=True)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    return total


def markdown(rows: list[dict]) -> str:
    lines = ["| model | parameters | fp32 weights | checkpoint | shards | peak RSS | weights / peak RSS | compress time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layers']} blocks × (hidden {r['hidden']}, MLP {r['intermediate']}) | {r['params']:,} | "
                     f"{r['model_gib']:.2f} GiB | {r['checkpoint_gib']:.2f} GiB | {r['shards']} | "
                     f"{r['peak_rss_gib']:.2f} GiB | {r['model_over_peak_rss']:.1f}× | {r['compress_seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=190)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-scale")
    p.add_argument("--jsonl", type=Path, help="append the result as a JSON line here")
    p.add_argument("--keep", action="store_true", help="keep the model and checkpoint (default: delete them)")
    a = p.parse_args()
    model, out = a.work / "model", a.work / "compressed"
    shutil.rmtree(a.work, ignore_errors=True)
    t0 = time.perf_counter()
    size = make_model(model, a)
    made = time.perf_counter() - t0
    recipe = a.work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "svd-llm one-pass", "calibration": {"dataset": str(SHARED / "data" / "calib" / "wiki_passages.jsonl"),
                                                     "samples": a.samples, "seq_len": a.seq_len},
        "engine": {"device": "cpu", "batch_size": a.samples, "sequential": False, "propagate": "original"},
        "stages": [{"method": "svd-llm", "param_ratio": a.ratio}], "samples": 0}))  # generation loads it whole
    lrc = Path(sys.executable).with_name("lrc")
    t1 = time.perf_counter()
    subprocess.run([str(lrc), "compress", str(model), "--recipe", str(recipe), "--out", str(out), "--cache-dir",
                    str(a.work / "cache")], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t1
    report = json.loads((out / "lrc_report.json").read_text())
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    res = {"bench": "scale", "layers": a.layers, "hidden": a.hidden, "intermediate": a.intermediate,
           "params": report["model_params"]["before"]["total"], "model_gib": round(size / 2**30, 3),
           "checkpoint_gib": round(written / 2**30, 3), "shards": len(list(out.glob("*.safetensors"))),
           "peak_rss_gib": report["peak_rss_gib"], "model_over_peak_rss": round(size / 2**30 / report["peak_rss_gib"], 2),
           "compress_seconds": round(wall, 1), "phase_seconds": report["phase_seconds"],
           "make_model_seconds": round(made, 1), "calibration": f"{a.samples} x {a.seq_len}",
           "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}
    print(json.dumps(res, indent=2))
    print(f"\n| model | fp32 weights | checkpoint | shards | peak RSS | weights / peak RSS | compress time |\n"
          f"|---|---:|---:|---:|---:|---:|---:|\n| {a.layers} × ({a.hidden}, {a.intermediate}) | {res['model_gib']:.2f} GiB "
          f"| {res['checkpoint_gib']:.2f} GiB | {res['shards']} | {res['peak_rss_gib']:.2f} GiB | "
          f"{res['model_over_peak_rss']:.1f}× | {wall:.0f} s |")
    if a.jsonl:
        with open(a.jsonl, "a") as f:
            f.write(json.dumps(res) + "\n")
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
