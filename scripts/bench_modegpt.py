"""MoDeGPT against SVD-LLM on SmolLM2-135M-Instruct: perplexity, zero-shot accuracy, speed, sample answers (the
MoDeGPT issue's benchmark; not a test).

Protocol: scripts/bench_quality.py's (calibration 64 x 512 tokens of ../shared/data/calib/wiki_passages.jsonl, seed
0; perplexity on the first 32 non-overlapping 512-token windows of WikiText-2 test; fp32, CPU, 2 threads). A
configuration is a bench_quality configuration (``modegpt@block_influence:0.8``, ``modegpt+modules=qk/vo@uniform:0.8``,
``dense``). Stages (``--stage``, all four by default, run in this order, every step of every configuration in its own
process, so timings and peak RSS are that step's own):

- compress: bench_quality's ``--one`` run (compression wall time, peak RSS after compression, measured kept fraction,
  perplexity) with ``--save``: each compressed model becomes an lrc checkpoint OUT/checkpoints/<safe config name>;
- samples: the checkpoint (``dense``: the model spec) reloaded; one greedy answer to --chat through the tokenizer's
  chat template (plain text when it has none) and the first 200 characters of a greedy continuation of --text;
- zeroshot: ``lrc eval CKPT --tasks ... --limit 200 --batch-size 8`` (lrc's evaluator); ``dense`` reuses --dense-eval
  (docs/results/smollm2-dense-eval.json) when its model, limit, batch size and tasks match, else runs it;
- bench: ``lrc bench CKPT --reference MODEL`` (prefill / decode tokens/s, ratios against dense; not run for dense).

Every step records its wall time and ``other_cpu_share`` (scripts/bench_compress.py's contention measure: the share
of the machine's CPU time other processes used while it ran; 10% or more marks a timing as not lrc's). --jsonl holds
one JSON object per configuration, rewritten (atomically) after every step; a step a row already has is skipped
(remove the row, or its key, to redo it). Logs: OUT/logs/. Full benchmark (idle machine, CPU):

    .venv/bin/python scripts/bench_modegpt.py --stage compress samples   # quiet machine: timings matter
    .venv/bin/python scripts/bench_modegpt.py --stage zeroshot
    .venv/bin/python scripts/bench_modegpt.py --stage bench              # quiet machine: timings matter
    .venv/bin/python scripts/bench_modegpt.py \\
        --configs modegpt@uniform:0.8 modegpt+modules=mlp@uniform:0.8 modegpt+modules=qk/vo@uniform:0.8   # ablations
    .venv/bin/python scripts/bench_modegpt.py --markdown                 # the tables again

Defaults: --model smollm2, --jsonl docs/results/modegpt-smollm2.jsonl, --out out/bench-modegpt (checkpoints, logs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402
from bench_compress import CONTENDED, busy_jiffies, other_cpu_share, revision  # noqa: E402

ROOT = bq.ROOT
LRC = str(Path(sys.executable).with_name("lrc"))
THREADS = os.environ.get("LRC_THREADS", "2")  # torch threads of every step (lrc eval / bench via OMP_NUM_THREADS)
CONFIGS = ["dense", "svd-llm@uniform:0.8", "svd-llm@uniform:0.6", "modegpt@block_influence:0.8",
           "modegpt@block_influence:0.6"]
TASKS = ["arc_easy", "piqa", "hellaswag", "winogrande"]
STAGES = ["compress", "samples", "zeroshot", "bench"]
DONE = {"compress": "perplexity", "samples": "samples", "zeroshot": "zero_shot", "bench": "bench"}


def sample(spec: str, chat: str, chat_tokens: int, text: str, text_tokens: int) -> dict:
    """Greedy answers of SPEC (a model spec or checkpoint, loaded as lrc loads it) to a chat prompt and a text."""
    import torch

    from compress.models import load_model

    torch.set_num_threads(int(THREADS))
    model, tok, _ = load_model(spec)

    def greedy(ids, n: int) -> str:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    templated = bool(getattr(tok, "chat_template", None))
    if templated:
        ids = tok.apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True,
                                      return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    else:
        ids = tok(chat, return_tensors="pt").input_ids
    return {"chat_prompt": chat, "chat_template": templated, "chat_answer": greedy(ids, chat_tokens),
            "text_prompt": text, "text_continuation": greedy(tok(text, return_tensors="pt").input_ids,
                                                             text_tokens)[:200]}


def step(cmd: list[str], log: Path) -> tuple[int, str, dict]:
    """Run CMD as its own process (stdout and stderr to LOG.out / LOG.err); exit code, stdout, and its measures."""
    log.parent.mkdir(parents=True, exist_ok=True)
    busy0, t0 = busy_jiffies(), time.monotonic()
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": THREADS})
        _, status, ru = os.wait4(proc.pid, 0)  # this child's own CPU time and peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    return proc.returncode, Path(f"{log}.out").read_text(), {
        "seconds": round(wall, 1), "other_cpu_share": round(other_cpu_share(busy_jiffies() - busy0,
                                                                             ru.ru_utime + ru.ru_stime, wall), 4),
        "process_peak_rss_gib": round(ru.ru_maxrss / 2**20, 3), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def result(out: str) -> dict | None:
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    return None if line is None else json.loads(line[7:])


def dense_eval(path: Path, model: str, tasks: list[str], limit: int, batch: int) -> dict | None:
    """The zero-shot part of an earlier ``lrc eval --json`` of the dense model, if it ran with these settings."""
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    z = d.get("zero_shot") or {}
    if d.get("model") == model and z.get("limit") == limit and z.get("batch_size") == batch and \
            z.get("num_fewshot") == 0 and set(tasks) <= set(z.get("tasks", {})):
        return {**z, "tasks": {t: z["tasks"][t] for t in tasks}, "source": str(path)}
    return None


def run_stage(stage: str, config: str, row: dict, a) -> dict | None:
    """One step of one configuration: the keys to add to its row, or None when it failed or cannot run yet."""
    name = bq.safe_name(config)
    log = a.out / "logs" / f"{name}.{stage}"
    target = a.model if config == "dense" else row.get("checkpoint")
    if stage != "compress" and target is None:
        print(f"{config}: {stage}: no checkpoint yet (run --stage compress first)", file=sys.stderr)
        return None
    if stage == "bench" and config == "dense":
        return None  # the reference itself: ratio 1 by definition
    print(f"{config}: {stage} ...", flush=True)
    if stage == "compress":
        cmd = [sys.executable, str(Path(bq.__file__)), "--model", a.model, "--samples", str(a.samples), "--seq-len",
               str(a.seq_len), "--windows", str(a.windows), "--cache", a.cache, "--jsonl", str(a.jsonl),
               "--save", str(a.out / "checkpoints"), "--one", config]
    elif stage == "samples":
        cmd = [sys.executable, __file__, "--sample", target, "--chat", a.chat, "--chat-tokens", str(a.chat_tokens),
               "--text", a.text, "--text-tokens", str(a.text_tokens)]
    elif stage == "zeroshot":
        if config == "dense" and (z := dense_eval(a.dense_eval, a.model, a.tasks, a.limit, a.eval_batch)):
            return {"zero_shot": z}
        cmd = [LRC, "eval", target, "--tasks", ",".join(a.tasks), "--limit", str(a.limit), "--batch-size",
               str(a.eval_batch), "--data-dir", str(a.data_dir), "--json", f"{log}.json"]
    else:
        cmd = [LRC, "bench", target, "--reference", a.model, "--seq-lens", a.seq_lens, "--decode-batches",
               a.decode_batches, "--decode-tokens", str(a.decode_tokens), "--repeats", str(a.repeats),
               "--device", a.device, "--json", f"{log}.json"]
    rc, out, measures = step(cmd, log)
    if rc or (stage in ("compress", "samples") and result(out) is None):
        print(f"{config}: {stage} failed (exit {rc}); {log}.err ends:\n" +
              Path(f"{log}.err").read_text()[-3000:], file=sys.stderr)
        return None
    measures["revision"] = revision()
    if stage == "compress":
        return {**result(out), "compress_step": measures}
    if stage == "samples":
        return {"samples": {**result(out), "step": measures}}
    data = json.loads(Path(f"{log}.json").read_text())
    if stage == "zeroshot":
        return {"zero_shot": {**data["zero_shot"], "step": measures}}
    return {"bench": {**data, "step": measures}}


def load(path: Path) -> dict[str, dict]:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    return {r["config"]: r for r in rows}


def write(path: Path, rows: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    os.replace(tmp, path)


def _mark(share: float | None) -> str:
    return f" (others {share:.0%})" if share is not None and share >= CONTENDED else ""


def markdown(rows: list[dict], tasks: list[str]) -> str:
    """One table row per configuration (– where a stage has not run), then every configuration's sample answers."""
    keys = next((list(r["bench"]["measured_speedup"]) for r in rows if "bench" in r), ["prefill@128", "prefill@512",
                                                                                     "decode@b1", "decode@b8"])
    pre_k, dec_k = (" / ".join(k.split("@")[1] for k in keys if k.startswith(p)) for p in ("prefill@", "decode@"))
    lines = ["| configuration | kept | perplexity | " + " | ".join(tasks) + " | mean acc | compress s | peak RSS GiB "
             f"| prefill tok/s × dense (@ {pre_k}) | decode tok/s × dense ({dec_k}) |",
             "|---|---:|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|---:|"]
    for r in rows:
        z = (r.get("zero_shot") or {}).get("tasks", {})
        accs = [z[t]["acc"] if t in z else None for t in tasks]
        mean = sum(accs) / len(accs) if accs and None not in accs else None
        speed = (r.get("bench") or {}).get("measured_speedup", {})
        dense = r.get("method") == "dense"
        pre = " / ".join(f"{v:.3f}" for k, v in speed.items() if k.startswith("prefill")) or ("1" if dense else "–")
        dec = " / ".join(f"{v:.3f}" for k, v in speed.items() if k.startswith("decode")) or ("1" if dense else "–")
        share = (r.get("bench") or {}).get("step", {}).get("other_cpu_share")
        secs = f"{r['compress_seconds']:.1f}{_mark(r['compress_step']['other_cpu_share'])}" \
            if "compress_seconds" in r else "–"
        kept = f"{r['kept_measured']:.4f}" if "kept_measured" in r else ("1" if dense else "–")
        if "kept_storage" in r:  # CoSpaDi: the budget is bytes; parameters leave the support masks out
            kept = f"{r['kept_storage']:.4f} of bytes ({kept} of params)"
        cells = [r["config"], kept,
                 f"{r['perplexity']:,.2f}" if "perplexity" in r else "–",
                 *["–" if x is None else f"{x:.3f}" for x in accs], "–" if mean is None else f"{mean:.3f}", secs,
                 f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else "–", pre + _mark(share), dec + _mark(share)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Timings marked (others X%): other processes used {CONTENDED:.0%} or more of the machine's CPU "
              "time while they ran; they show that run, not lrc's speed.", "", "Sample answers (greedy):"]
    for r in rows:
        if "samples" in r:
            s = r["samples"]
            lines.append(f"- `{r['config']}`: chat {json.dumps(s['chat_prompt'])} → {json.dumps(s['chat_answer'])}; "
                         f"text {json.dumps(s['text_prompt'])} → {json.dumps(s['text_continuation'])}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--stage", nargs="+", choices=STAGES, default=STAGES)
    ap.add_argument("--jsonl", type=Path, default=ROOT / "docs" / "results" / "modegpt-smollm2.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-modegpt", help="checkpoints, logs")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "lrc"))
    ap.add_argument("--tasks", type=lambda v: v.split(","), default=TASKS, help="comma-separated")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--data-dir", type=Path, default=bq.SHARED / "data")
    ap.add_argument("--dense-eval", type=Path, default=ROOT / "docs" / "results" / "smollm2-dense-eval.json")
    ap.add_argument("--seq-lens", default="128,512")
    ap.add_argument("--decode-batches", default="1,8")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chat", default="What is the capital of France?")
    ap.add_argument("--chat-tokens", type=int, default=40)
    ap.add_argument("--text", default="Once upon a time, in a small village,")
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--markdown", action="store_true", help="print the --jsonl results as tables and exit")
    ap.add_argument("--sample", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.out = a.out.resolve()
    if a.sample:
        print("RESULT " + json.dumps(sample(a.sample, a.chat, a.chat_tokens, a.text, a.text_tokens)))
        return
    if not a.markdown:
        rows = load(a.jsonl)
        for stage in a.stage:
            for config in a.configs:
                row = rows.get(config, {"config": config})
                if DONE[stage] in row:
                    continue
                new = run_stage(stage, config, row, a)
                if new is None:
                    continue
                rows[config] = {**row, **new}
                write(a.jsonl, rows)
    print(markdown(list(load(a.jsonl).values()), a.tasks))


if __name__ == "__main__":
    main()
