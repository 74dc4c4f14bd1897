"""Issue 24's benchmark: models a user would keep — allocation searched across matrices (``search``), block
refinement (``refine``) and recovery distillation, against the uniform baselines (not a test).

Protocol (docs/benchmarks.md): SmolLM2-135M-Instruct in fp32 on the CPU (2 threads); calibration 64 windows × 512
tokens of ../shared/data/calib/wiki_passages.jsonl (seed 0); WikiText-2 test, the first 32 non-overlapping 512-token
windows; ``lrc eval --chat`` (the answer score of the bundled checkable prompts, compressed and dense side by side,
and the mean KL over the dense replies); with ``--zeroshot`` also arc_easy / piqa / hellaswag / winogrande at
limit 200. "kept" is the fraction of decoder-block Linear parameters kept (embeddings and lm_head excluded), measured
on the result. Each configuration runs ``lrc``'s own pipeline (``api.compress``: compression, fine-tuning, the
recipe's evaluation on the checkpoint as written) in its own process (its own peak RSS); rows are appended to
--jsonl as they finish.

A configuration is ``NAME[+refine][+ft[N]][+chat][+qBITS[rtn]][+cRANK[iBITS]][+bytes][+e8|+e4]:KEPT`` with NAME one of ``STAGES``
(``search/svd-llm+refine:0.8``), or ``dense`` with a ``+q`` modifier for quantization alone (``dense+q4rtn:1``).
``+ft`` adds the README main job's recovery distillation (32 steps), ``+ftN`` N steps on N × 4 fresh samples.
``+chat`` calibrates on text the model writes itself, chat-formatted (``calibration.dataset: selfgen``, the same
windows) instead of Wikipedia; ``+chatq`` draws its user turns (and the distillation's) from the bundled
instructions and short questions (``selfgen_prompts: instructions+questions``). ``+q4`` / ``+q3`` store every block Linear the stages leave (factors included) as
4- / 3-bit codes, GPTQ, asymmetric, groups of 128 (``+q4rtn``: round to nearest); ``+q8``: 8-bit symmetric per
output channel (PyTorch's int8 weight-only kernel); ``+c32``: each quantized Linear
also gets an EoRA residual of rank 32 repairing its quantization error (``quantize.compensate``, in the bytes;
``+c32i4``: its two factors stored as 4-bit codes too). Embeddings and head stay in the model's dtype unless ``+e8`` /
``+e4`` (int8 rows / int4 groups of 64, RTN, the tied head using the same table). ``+bytes`` (a search NAME): KEPT
is the whole checkpoint's share of its bf16 bytes, and the search chooses each module's knob and width
(``BYTE_WIDTHS``) under what the embeddings and norms leave. ``+ftN`` with ``+q…``: the fine-tuned row's kept checkpoint, then
quantized by a recipe of its own (lrc's order: compress, fine-tune, quantize; ``_quantized_after``). ``--no-chat`` skips ``lrc eval --chat`` (answers, chat
KL: minutes per row); ``--keep DIR`` keeps each checkpoint in DIR (for ``lrc bench``, or reading its replies);
``--zeroshot-kept --keep DIR --configs ...`` adds the zero-shot tasks to finished rows from their kept checkpoints,
``--answers-kept`` the answer score and chat KL to rows that ran with ``--no-chat``.

    python scripts/bench_usable.py --jsonl docs/results/usable-smollm2-64x512.jsonl --configs modegpt+refine:0.8
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LRC_SHARED", ROOT.parent / "shared"))
CALIB = SHARED / "data" / "calib" / "wiki_passages.jsonl"
WIKI = SHARED / "data" / "wikitext2" / "wikitext2_raw_test.jsonl"
TASKS = ["arc_easy", "piqa", "hellaswag", "winogrande"]
# ``--zeroshot`` / ``--zeroshot-kept``: the eval section's zero-shot fields (the shared task files, or LRC_DATA_DIR)
ZEROSHOT = {"tasks": TASKS, "limit": 200, "data_dir": os.environ.get("LRC_DATA_DIR", str(SHARED / "data"))}
SEARCH = {"samples": 4, "trials": 10}  # LEMS: 32 sequences of 2048 tokens; 4 × 512 here (one forward per matrix)
STAGES = {
    "svd-llm": {"method": "svd-llm"},
    "kfac-svd": {"method": "kfac-svd"},
    "modegpt": {"method": "modegpt", "allocator": "block_influence"},
    "search/svd-llm": {"method": "svd-llm", "allocator": "search", "allocator_options": SEARCH},
    "search/kfac-svd": {"method": "kfac-svd", "allocator": "search", "allocator_options": SEARCH},
    # across methods: MoDeGPT units compete with the same modules compressed Linear by Linear (one budget)
    "search/modegpt,svd-llm": {"methods": ["modegpt", "svd-llm"], "allocator": "search", "allocator_options": SEARCH},
    "search/modegpt,svd-llm,kfac-svd": {"methods": ["modegpt", "svd-llm", "kfac-svd"], "allocator": "search",
                                        "allocator_options": SEARCH},
}
# AA-SVD's optimiser (lr 1e-4 … clip 1.0) with its 200 steps × 32 sequences scaled to this machine: 12 steps of 8
# sequences per block (1.5 passes over the 64 calibration windows; ~1.7 s a step here)
REFINE = {"steps": 12, "batch_size": 8, "lr": 1e-4}
REFINE_LONG = {"steps": 24, "batch_size": 8, "lr": 3e-4}  # ``+refine2``: twice the steps at 3× the rate
# ``+chatq``: ``+chat`` with the bundled short questions beside the instructions as user turns (calibration and
# the distillation's samples alike)
QA_PROMPTS = "instructions+questions"
# the README main job's recovery distillation (recipes/svd-llm-chat-ft.yaml)
FINETUNE = {"data": "selfgen", "selfgen_samples": 128, "seq_len": 128, "loss": "distill", "train": "lrc",
            "steps": 32, "batch_size": 4, "lr": 1e-4, "warmup": 3, "holdout": 8, "eval_every": 32}


# ``+bytes``: the widths a byte-budget search chooses from per module (16: not quantized), GPTQ at groups of 128
BYTE_WIDTHS = [3, 4, 8, 16]
# ``+e8`` / ``+e4``: the token embeddings (tied head) stored as int8 (one symmetric scale per row: PyTorch's int8
# kernel runs the head) or int4 (asymmetric groups of 64, which divide SmolLM2's 576: the int4 kernel)
EMBEDDINGS = {"e8": {"bits": 8, "group_size": None, "symmetric": True},
              "e4": {"bits": 4, "group_size": 64, "symmetric": False}}


def quantize_for(mod: str) -> dict:
    """The recipe's ``quantize`` section of a ``+q…`` modifier."""
    bits = int(mod[1])
    if bits == 8:
        return {"bits": 8, "group_size": None, "symmetric": True, "method": "rtn" if mod.endswith("rtn") else "gptq"}
    return {"bits": bits, "group_size": 128, "method": "rtn" if mod.endswith("rtn") else "gptq"}


def recipe_for(config: str, samples: int, seq_len: int, windows: int, zeroshot: bool, chat: bool = True) -> dict:
    head, kept = config.rsplit(":", 1)
    name, *mods = head.split("+")
    data = {"calibration": {"dataset": str(CALIB), "samples": samples, "seq_len": seq_len},
            "engine": {"device": "cpu", "batch_size": 8},
            "stages": [] if name == "dense" else [{**STAGES[name], "param_ratio": float(kept)}],
            "eval": {"ppl": [str(WIKI)], "seq_len": 512, "max_windows": windows, "chat": chat,
                     **(ZEROSHOT if zeroshot else {})},
            "samples": 0}
    if "chat" in mods or "chatq" in mods:  # text the model writes itself, chat-formatted (--calib selfgen)
        data["calibration"] = {"dataset": "selfgen", "samples": samples, "seq_len": seq_len,
                               **({"selfgen_prompts": QA_PROMPTS} if "chatq" in mods else {})}
    for m in mods:
        if m.startswith("q"):
            data["quantize"] = quantize_for(m)
    if "bytes" in mods:  # KEPT is the whole checkpoint's share of its bf16 bytes: the stage gets what is left
        data["quantize"] = {**quantize_for("q4"), "bits_options": BYTE_WIDTHS}
        stage = data["stages"][0]
        stage["byte_ratio"] = stage_byte_ratio(float(kept), next((EMBEDDINGS[m] for m in mods if m in EMBEDDINGS),
                                                                 None))
        del stage["param_ratio"]
    for m in mods:  # ``+cN[iB]``: EoRA residuals of rank N (factors at B bits) on every quantized Linear
        comp = re.fullmatch(r"c(\d+)(?:i(\d+))?", m)
        if comp:
            data["quantize"]["compensate"] = {"rank": int(comp[1]), "bits": int(comp[2] or 16)}
    for m in mods:
        if m in EMBEDDINGS:
            data.setdefault("quantize", {"bits": 4, "targets": ["^$"]})["embeddings"] = EMBEDDINGS[m]
    if "refine" in mods or "refine2" in mods:
        data["refine"] = REFINE if "refine" in mods else REFINE_LONG
    for m in mods:  # ``+ft``: the main job's 32 distillation steps; ``+ftN``: N steps (eval every N)
        if m == "ft" or (m.startswith("ft") and m[2:].isdigit()):
            steps = int(m[2:] or FINETUNE["steps"])
            data["finetune"] = {**FINETUNE, "steps": steps, "eval_every": steps,  # one pass over fresh samples
                                "selfgen_samples": max(FINETUNE["selfgen_samples"], steps * FINETUNE["batch_size"]),
                                **({"selfgen_prompts": QA_PROMPTS} if "chatq" in mods else {})}
    return data


def model_shape(model_spec: str = "smollm2") -> dict:
    """The counts a byte budget needs: block Linear parameters, embedding table shape, other parameters."""
    from compress.models import load_model

    model, _, _ = load_model(model_spec)
    linear = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                 for n, m in model.named_modules() if ".layers." in n and type(m).__name__ == "Linear")
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied head counted once
    return {"linear": linear, "vocab": emb.shape[0], "dim": emb.shape[1], "total": total}


SHAPE: dict = {}


def stage_byte_ratio(kept_bytes: float, embeddings: dict | None) -> float:
    """The stage's ``byte_ratio`` (of the block Linears' 16-bit bytes) that makes the whole checkpoint ``kept_bytes``
    of its bf16 bytes: the embeddings at their width (``embeddings``; bf16 when None), every other tensor (norms)
    at 2 bytes a value, and the Linears what is left."""
    from compress.quant.math import QuantSpec, storage_bytes

    if not SHAPE:
        SHAPE.update(model_shape())
    v, d = SHAPE["vocab"], SHAPE["dim"]
    table = 2 * v * d if embeddings is None else storage_bytes(v, d, QuantSpec(**embeddings))
    rest = 2 * (SHAPE["total"] - SHAPE["linear"] - v * d)
    left = kept_bytes * 2 * SHAPE["total"] - table - rest
    if left <= 0:
        raise SystemExit(f"{kept_bytes} of the bf16 bytes leaves nothing for the blocks' Linears")
    return round(left / (2 * SHAPE["linear"]), 6)


def kept_dir(keep: Path, config: str) -> Path:
    """Where ``--keep`` writes (and ``--zeroshot-kept`` reads) a configuration's checkpoint."""
    return keep / re.sub(r"[^A-Za-z0-9.+_-]", "_", config)


def zero_shot_fields(ev: dict) -> dict:
    """A row's zero-shot accuracy per task and mean, from an evaluation's ``zero_shot`` (none when it ran none)."""
    if not ev.get("zero_shot"):
        return {}
    return {"zero_shot": {t: v["acc"] for t, v in ev["zero_shot"]["tasks"].items()},
            "zero_shot_mean": ev["zero_shot"]["mean"]["acc"]}


def one(model_spec: str, config: str, samples: int, seq_len: int, windows: int, zeroshot: bool, cache: str,
        chat: bool = True, keep: str | None = None) -> dict:
    import torch

    from compress import api
    from compress.recipe import parse_recipe

    torch.set_num_threads(int(os.environ.get("LRC_THREADS", "2")))
    if config == "dense":
        return _dense(model_spec, windows, zeroshot)
    data = recipe_for(config, samples, seq_len, windows, zeroshot, chat)
    if "finetune" in data and "quantize" in data:
        return _quantized_after(model_spec, config, data, samples, seq_len, cache, keep)
    recipe = parse_recipe(data)
    with tempfile.TemporaryDirectory() as tmp:  # ``keep``: the checkpoint stays (for lrc bench, reading replies)
        out = kept_dir(Path(keep), config) if keep else Path(tmp) / "out"
        _, report = api.compress(model_spec, recipe, out, cache_dir=cache, progress=False, return_model=False,
                                 overwrite=bool(keep))
    return _row(config, model_spec, samples, seq_len, recipe, report)


def _quantized_after(model_spec: str, config: str, data: dict, samples: int, seq_len: int, cache: str,
                     keep: str | None) -> dict:
    """``…+ftN+qB…``: lrc's order for a fine-tuned model (README, "Quantized storage"): the fine-tuned row's kept
    checkpoint (``BASE``: the configuration without its ``+q…`` / ``+c…`` / ``+e…`` modifiers, run first with
    ``--keep``), then a recipe with only the quantize section on it, calibrated on the same kind of text (sampled
    by that checkpoint when ``+chat``). The chat evaluation's reference is that checkpoint (the model compressed),
    so the row records the answers and KL beside it (``base_answer_score``, ``chat_kl_to_base``) and keeps the
    dense model's answer score as the base row measured it; ``compress_seconds`` is the quantization's alone."""
    from compress import api
    from compress.recipe import parse_recipe

    base = base_config(config)
    src = kept_dir(Path(keep), base) if keep else None
    if src is None or not (src / "lrc_report.json").is_file():
        raise SystemExit(f"{config}: quantizes {base}'s kept checkpoint: run that row with --keep first")
    recipe = parse_recipe({**{k: data[k] for k in ("calibration", "engine", "quantize", "eval")}, "stages": [],
                           "samples": 0})
    _, report = api.compress(str(src), recipe, kept_dir(Path(keep), config), cache_dir=cache, progress=False,
                             return_model=False, overwrite=True)
    row = _row(config, model_spec, samples, seq_len, recipe, report)
    before = json.loads((src / "lrc_report.json").read_text())
    answers = before.get("eval", {}).get("chat", {}).get("answers", {})
    row.update(base=base, kept_measured=before["targeted"]["kept_fraction_of_targeted"],
               params_after=before["targeted"]["params_after"], dense_params=before["model_params"]["before"]["total"],
               base_answer_score=row["reference_answer_score"], chat_kl_to_base=row.pop("chat_kl"),
               reference_answer_score=answers.get("reference_answer_score"))
    return row


def base_config(config: str) -> str:
    """The configuration without its storage modifiers (``+qB``, ``+cN[iB]``, ``+e8`` / ``+e4``): what a
    ``…+ftN+q…`` row quantizes."""
    head, kept = config.rsplit(":", 1)
    name, *mods = head.split("+")
    return "+".join([name, *(m for m in mods if not re.fullmatch(r"q\d+(rtn)?|c\d+(i\d+)?|e[48]", m))]) + ":" + kept


def chat_fields(chat: dict) -> dict:
    """A row's fields of an ``lrc eval --chat`` result (``chat_eval``'s dict; empty when none ran): the answer score
    beside the reference's, its score by kind, the chat KL and the first replies."""
    answers = chat.get("answers", {})
    return {"chat_kl": chat.get("mean_kl"), "non_empty": chat.get("non_empty"),
            "answer_score": answers.get("answer_score"),
            "reference_answer_score": answers.get("reference_answer_score"),
            "replies": [(s["prompt"], s["reply"]) for s in chat.get("samples", [])[:6]],
            "answer_replies": [(s["prompt"], s["reply"], s["correct"]) for s in answers.get("samples", [])[:10]],
            "answers_by_kind": {k: v.get("answer_score") for k, v in answers.get("by_kind", {}).items()}}


def _row(config: str, model_spec: str, samples: int, seq_len: int, recipe, report: dict) -> dict:
    """A configuration's results, from its run's report."""
    ev = report["eval"]
    out = {"config": config, "model": model_spec, "calibration": f"{samples}x{seq_len}",
           "kept_measured": report["targeted"]["kept_fraction_of_targeted"],
           "params_after": report["targeted"]["params_after"],
           "compress_seconds": report["seconds"], "total_seconds": report["total_seconds"],
           "phase_seconds": report["phase_seconds"], "peak_rss_gib": report["peak_rss_gib"],
           "perplexity": next(iter(ev["perplexity"].values()))["perplexity"], **chat_fields(ev.get("chat", {}))}
    if "refine" in report:
        out["refine"] = {k: v for k, v in report["refine"].items() if k != "blocks"}
    cb = report["checkpoint_bytes"]
    out["checkpoint_bytes"] = cb
    out["dense_params"] = report["model_params"]["before"]["total"]  # embeddings and head included
    # as a bfloat16 checkpoint: the quantized tensors as written, every other tensor at 2 bytes a value
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[recipe.model.dtype]
    out["bf16_bytes"] = cb["quantized"] + (cb["tensors"] - cb["quantized"]) * 2 // width
    if "quantization" in report:
        out["quantization"] = {k: v for k, v in report["quantization"].items() if k != "rows"}
    if "allocation" in report:
        out["search_trials"] = [t for rec in report["allocation"].values() if rec for t in rec["trials"]]
    if "finetune" in report:
        out["finetune_seconds"] = report["finetune"].get("seconds")
    out.update(zero_shot_fields(ev))
    return out


def _dense(model_spec: str, windows: int, zeroshot: bool) -> dict:
    """The dense model through the same evaluation (its answer score is also every row's reference)."""
    import time

    from compress.eval.run import evaluate_model
    from compress.models import load_model
    from compress.recipe import EvalConfig

    model, tok, _ = load_model(model_spec)
    t = time.perf_counter()
    ev = evaluate_model(model, tok, EvalConfig(ppl=[str(WIKI)], seq_len=512, max_windows=windows, chat=True,
                                               **(ZEROSHOT if zeroshot else {})),
                        progress=False)
    chat = chat_fields(ev.get("chat", {}))
    out = {"config": "dense", "model": model_spec, "kept_measured": 1.0, "compress_seconds": 0.0,
           "total_seconds": round(time.perf_counter() - t, 1), "peak_rss_gib": 0.0,
           "perplexity": next(iter(ev["perplexity"].values()))["perplexity"],
           **{k: chat[k] for k in ("answer_score", "answers_by_kind")}}
    out.update(zero_shot_fields(ev))
    return out


def _load_kept(checkpoint: Path | str):
    import torch

    from compress.models import load_model

    torch.set_num_threads(int(os.environ.get("LRC_THREADS", "2")))
    return load_model(str(checkpoint))[:2]  # (model, tokenizer), fp32


def zeroshot_of_kept(checkpoint: Path, model_spec: str) -> dict:
    """The four zero-shot tasks at limit 200 on a checkpoint ``--keep`` wrote (the row's own weights, measured after
    it: ``--zeroshot`` in the run itself costs the same ~9 min, this lets a row finish first)."""
    from compress.eval.run import evaluate_model
    from compress.recipe import EvalConfig

    model, tok = _load_kept(checkpoint)
    ev = evaluate_model(model, tok, EvalConfig(ppl=[], **ZEROSHOT), progress=False)
    return {**zero_shot_fields(ev), "zero_shot_checkpoint": str(checkpoint)}


@functools.cache
def _reference(model_spec: str):
    """The dense model the chat KL and the reference answers are measured against, loaded once per process."""
    return _load_kept(model_spec)[0]


def chat_of_kept(checkpoint: Path, model_spec: str) -> dict:
    """``lrc eval --chat`` on a checkpoint ``--keep`` wrote, against the dense ``model_spec``: the answer score and
    the chat KL of a row that ran with ``--no-chat`` (the byte rows), as ``_row`` records them."""
    from compress.eval.chat import chat_eval

    model, tok = _load_kept(checkpoint)
    return {**chat_fields(chat_eval(model, tok, _reference(model_spec), cache=True)),
            "chat_checkpoint": str(checkpoint)}


KEPT_EVALS = {"zeroshot": ("zero_shot_mean", zeroshot_of_kept), "chat": ("answer_score", chat_of_kept)}


def add_from_kept(jsonl: Path, keep: Path, configs: list[str], what: str, model_spec: str = "smollm2") -> None:
    """Rewrite the rows of ``configs`` in ``jsonl`` that lack ``what`` (``KEPT_EVALS``: the zero-shot tasks, or
    the answer score and chat KL) with its measurement on their kept checkpoints; after each row, so a stop keeps
    the rest."""
    field, measure = KEPT_EVALS[what]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for r in rows:
        if r["config"] not in configs or r.get(field) is not None:
            continue
        ckpt = kept_dir(keep, r["config"])
        if not (ckpt / "config.json").is_file():
            print(f"{r['config']}: no checkpoint at {ckpt}", file=sys.stderr)
            continue
        r.update(measure(ckpt, model_spec))
        jsonl.write_text("".join(json.dumps(x) + "\n" for x in rows))
        print(f"{r['config']:36s} {field} {r[field]:.3f}", flush=True)


def dense_reference(rows: list[dict], eval_json: Path) -> dict:
    """The dense row: a measured ``dense`` row when the file has one, else the dense model's perplexity and
    zero-shot accuracy from ``eval_json`` (the same protocol, docs/results/smollm2-dense-eval.json) and its answer
    score as every row measured it beside the compressed model's."""
    row = next((r for r in rows if r["config"] == "dense"), None)
    if row is not None:
        return row
    ev = json.loads(eval_json.read_text())
    scores = {r["reference_answer_score"] for r in rows if r.get("reference_answer_score") is not None}
    return {"config": "dense", "perplexity": next(iter(ev["perplexity"].values()))["perplexity"],
            "zero_shot_mean": ev.get("zero_shot", {}).get("mean", {}).get("acc"),
            "answer_score": scores.pop() if len(scores) == 1 else None}


def markdown(rows: list[dict], dense: dict | None = None) -> str:
    """The rows as a markdown table, the dense model first (a value a row did not measure shows as –; a zero-shot
    mean marked † is an earlier run's of the same configuration and protocol, ``zero_shot_from`` names it)."""
    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    def zs(r):
        return f(r.get("zero_shot_mean"), ".3f") + ("†" if r.get("zero_shot_from") else "")

    lines = ["| configuration | kept | perplexity | × dense | answers | chat KL | zero-shot mean | compress s | "
             "total s | peak RSS GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = dense["perplexity"] if dense else None
    if dense is not None and not any(r["config"] == "dense" for r in rows):
        lines.append(f"| dense | 1.0000 | {dense['perplexity']:,.2f} | 1.00 | {f(dense.get('answer_score'), '.2f')} | "
                     f"– | {f(dense.get('zero_shot_mean'), '.3f')} | – | – | – |")
    for r in rows:
        lines.append(f"| {r['config']} | {r['kept_measured']:.4f} | {r['perplexity']:,.2f} | "
                     f"{f(r['perplexity'] / base if base else None, '.2f')} | {f(r.get('answer_score'), '.2f')} | "
                     f"{f(r.get('chat_kl'), '.3f')} | {zs(r)} | "
                     f"{f(r.get('compress_seconds') or None, '.0f')} | {f(r.get('total_seconds'), '.0f')} | "
                     f"{f(r.get('peak_rss_gib') or None, '.2f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--configs", nargs="*", default=[])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--zeroshot", action="store_true", help="also the four zero-shot tasks at limit 200 (~9 min)")
    ap.add_argument("--no-chat", action="store_true", help="skip lrc eval --chat (the answer score and chat KL)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "lrc"))
    ap.add_argument("--keep", help="write each checkpoint to KEEP/<config> (kept) instead of a temporary directory")
    ap.add_argument("--jsonl", type=Path, required=True)
    ap.add_argument("--markdown", action="store_true", help="print the --jsonl results as a table and exit")
    ap.add_argument("--zeroshot-kept", action="store_true",
                    help="add the zero-shot tasks to the --configs rows of --jsonl from their --keep checkpoints")
    ap.add_argument("--answers-kept", action="store_true",
                    help="add the answer score and chat KL to the --configs rows of --jsonl that ran with --no-chat, "
                         "from their --keep checkpoints")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.zeroshot_kept or a.answers_kept:
        if not a.keep:
            ap.error("--zeroshot-kept / --answers-kept need --keep (the directory the rows' checkpoints were kept in)")
        for what in ("zeroshot",) * a.zeroshot_kept + ("chat",) * a.answers_kept:
            add_from_kept(a.jsonl, Path(a.keep), a.configs, what, a.model)
        return
    if a.markdown:
        rows = [json.loads(line) for line in a.jsonl.read_text().splitlines()]
        print(markdown(rows, dense_reference(rows, ROOT / "docs" / "results" / "smollm2-dense-eval.json")))
        return
    if a.one:
        print("RESULT " + json.dumps(one(a.model, a.one, a.samples, a.seq_len, a.windows, a.zeroshot, a.cache,
                                         not a.no_chat, a.keep)))
        return
    done = {json.loads(line)["config"] for line in a.jsonl.read_text().splitlines()} if a.jsonl.is_file() else set()
    for config in a.configs:
        if config in done:
            continue
        cmd = [sys.executable, __file__, "--model", a.model, "--samples", str(a.samples), "--seq-len",
               str(a.seq_len), "--windows", str(a.windows), "--cache", a.cache, "--jsonl", str(a.jsonl),
               "--one", config] + (["--zeroshot"] if a.zeroshot else []) + (["--no-chat"] if a.no_chat else []) + \
            (["--keep", a.keep] if a.keep else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{config}: failed\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        r = json.loads(line[7:])
        with a.jsonl.open("a") as fh:
            fh.write(json.dumps(r) + "\n")
        print(f"{config:36s} ppl {r['perplexity']:10.2f}  answers {r.get('answer_score')}  kl {r.get('chat_kl')}  "
              f"{r['total_seconds']:7.0f} s", flush=True)


if __name__ == "__main__":
    main()
