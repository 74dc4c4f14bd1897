"""``lrc eval``: perplexity, KL/agreement to a dense reference and lm-eval zero-shot accuracy, as one JSON result."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..models import is_lrc_checkpoint, load_model, model_context
from ..progress import Progress
from ..recipe import EvalConfig
from .data import load_eval_text
from .kl import kl_to_reference
from .perplexity import perplexity_of_ids, tokenize
from .zeroshot import mean_of


def effective_seq_len(model, seq_len: int) -> int:
    """``seq_len`` capped by the model's context (``models.model_context``, which calibration refuses to exceed)."""
    ctx = model_context(model.config)
    return min(seq_len, ctx[1]) if ctx else seq_len


def protocol(seq_len: int, stride: int | None, bos: bool, res) -> str:
    windows = (f"sliding windows (stride {stride})" if stride and stride != seq_len else "non-overlapping windows")
    return (f"rows joined with '\\n\\n', tokenized once without special tokens; {windows} of {seq_len} tokens"
            f"{' after a BOS token' if bos else ''}; token-weighted mean NLL over {res.tokens} scored tokens in "
            f"{res.windows} windows; exp")


def evaluate_model(model, tokenizer, cfg: EvalConfig, reference=None, progress: bool = True) -> dict:
    """Run ``cfg`` on a loaded model: perplexity per set, KL to ``reference`` (a loaded dense model) on the same
    windows, and the zero-shot tasks. Returns ``{"perplexity", "kl", "zero_shot"}``. ``progress``: a bar on a
    terminal, a log line per set and task elsewhere (``compress/progress.py``)."""
    bar = Progress(enabled=progress)
    try:
        out = _evaluate(model, tokenizer, cfg, reference, bar)
        bar.done()
    finally:
        bar.close()
    return out


def _evaluate(model, tokenizer, cfg: EvalConfig, reference, bar: Progress) -> dict:
    L = effective_seq_len(model, cfg.seq_len)
    bos_id = tokenizer.bos_token_id if cfg.bos else None
    out: dict = {"perplexity": {}, "kl": {}}
    for source in cfg.ppl:
        bar.phase(f"perplexity {source}")
        t0 = time.perf_counter()
        ids = tokenize(tokenizer, load_eval_text(source))
        try:
            res = perplexity_of_ids(model, ids, L, cfg.stride, cfg.max_windows, cfg.batch_size, bos_id)
        except ValueError as e:  # window arithmetic: too short a text, bad stride
            from ..errors import LrcError

            raise LrcError(f"--ppl {source}: {e}") from None
        out["perplexity"][source] = {
            **res.to_dict(), "dataset": source, "seconds": round(time.perf_counter() - t0, 2),
            "protocol": protocol(L, cfg.stride, cfg.bos, res)}
        if reference is not None:
            bar.phase(f"KL to the reference on {source}")
            out["kl"][source] = kl_to_reference(model, reference, ids, L, cfg.stride, cfg.max_windows,
                                                cfg.batch_size, bos_id).to_dict()
    if cfg.chat:
        from .chat import chat_eval

        bar.phase("chat prompts")
        out["chat"] = chat_eval(model, tokenizer, reference, cache=cfg.request_cache)
    if cfg.tasks:
        from .zeroshot import zero_shot

        t0 = time.perf_counter()
        out["zero_shot"] = zero_shot(model, tokenizer, cfg.tasks, cfg.data_dir, cfg.limit, cfg.batch_size,
                                     cache=cfg.request_cache, progress=bar)
        out["zero_shot"]["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def preflight(cfg: EvalConfig) -> None:
    """Check that every perplexity source and zero-shot data file exists, before any expensive work."""
    from ..calibration import check_source

    for source in cfg.ppl:
        check_source(source, "eval.ppl", split="eval")
    if cfg.tasks:
        from .zeroshot import check_tasks, resolve_data_dir

        check_tasks(cfg.tasks, resolve_data_dir(cfg.data_dir))


def evaluate(model_spec: str, cfg: EvalConfig, reference: str | None = None, dtype: str = "float32",
             device: str = "auto", device_map: str | None = None) -> dict:
    """Load MODEL (and REFERENCE) on ``device`` (``auto``: CUDA when present), run ``cfg``; results of an lrc
    checkpoint are merged into its report. ``device_map`` (e.g. ``auto``) instead lets accelerate place the model
    over the GPUs, the CPU and disk as it fits, for models larger than one device."""
    from ..engine.device import resolve_device

    preflight(cfg)
    dev = resolve_device(device)
    model, tokenizer, path = load_model(model_spec, dtype, device_map=device_map)
    ref = load_model(reference, dtype, device_map=device_map)[0] if reference else None
    if device_map is None:
        model = model.to(dev)
        ref = ref.to(dev) if ref is not None else None
    out = {"model": model_spec, "reference": reference, **evaluate_model(model, tokenizer, cfg, ref)}
    if is_lrc_checkpoint(path):
        merge_into_report(Path(path), out)
    return out


def merge_into_report(checkpoint: Path, results: dict) -> None:
    """Add the results under ``eval`` in the checkpoint's ``lrc_report.json`` (created if missing)."""
    report_path = checkpoint / "lrc_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    ev = report.setdefault("eval", {})
    for key in ("perplexity", "kl"):
        ev.setdefault(key, {}).update(results.get(key, {}))
    if "zero_shot" in results:
        zs = ev.setdefault("zero_shot", {"tasks": {}})
        zs["tasks"].update(results["zero_shot"]["tasks"])
        zs.update({k: v for k, v in results["zero_shot"].items() if k not in ("tasks", "mean")})
        zs["mean"] = mean_of(zs["tasks"])
    tmp = report_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(report_path)


def results_tables(results: dict, title: str) -> list:
    """Rich tables: perplexity (+ KL) per set, and zero-shot acc / acc_norm per task with the mean."""
    from rich.table import Table

    tables = []
    if results.get("perplexity"):
        table = Table(title=f"perplexity: {title}")
        for col in ("dataset", "perplexity", "seq_len", "windows", "tokens", "KL(dense‖model)", "top-1 agree"):
            table.add_column(col)
        for name, r in results["perplexity"].items():
            kl = results.get("kl", {}).get(name)
            table.add_row(name, f"{r['perplexity']:.4f}", str(r["seq_len"]), str(r["windows"]), f"{r['tokens']:,}",
                          f"{kl['kl']:.5f}" if kl else "–", f"{kl['top1_agreement']:.4f}" if kl else "–")
        tables.append(table)
    zs = results.get("zero_shot")
    if zs:
        limit = f", first {zs['limit']} docs per task" if zs.get("limit") else ""
        table = Table(title=f"zero-shot (lm-eval {zs.get('lm_eval_version', '')}, 0-shot{limit}): {title}")
        for col in ("task", "n", "acc", "± stderr", "acc_norm", "± stderr"):
            table.add_column(col)
        fmt = (lambda e, k: f"{e[k]:.4f}" if k in e and e[k] is not None else "–")
        for name, e in zs["tasks"].items():
            table.add_row(name, str(e.get("n", "")), fmt(e, "acc"), fmt(e, "acc_stderr"), fmt(e, "acc_norm"),
                          fmt(e, "acc_norm_stderr"))
        m = zs["mean"]
        table.add_row("mean", "", fmt(m, "acc"), "", fmt(m, "acc_norm"), "", style="bold")
        tables.append(table)
    chat = results.get("chat")
    if chat:
        kl = f", mean KL to the dense replies {chat['mean_kl']:.4f}" if "mean_kl" in chat else ""
        table = Table(title=f"chat ({chat['prompts']} fixed prompts, greedy, {chat['max_new_tokens']} tokens): "
                            f"{chat['non_empty']:.0%} non-empty{kl}: {title}")
        table.add_column("prompt")
        table.add_column("reply")
        if "mean_kl" in chat:
            table.add_column("dense reply")
        for s in chat["samples"][:4]:
            table.add_row(s["prompt"], s["reply"] or "(empty)", *([s["reference"] or "(empty)"] if "mean_kl" in chat
                                                                  else []))
        tables.append(table)
        if chat.get("answers"):
            tables.append(answers_table(chat["answers"], title))
    return tables


def answers_line(answers: dict) -> str:
    """``answers correct: X/N (dense Y/N)`` (the dense part with a reference)."""
    dense = (f" (dense {answers['reference_correct']}/{answers['items']})" if "reference_correct" in answers else "")
    return f"answers correct: {answers['correct']}/{answers['items']}{dense}"


def answers_table(answers: dict, title: str):
    """The checkable answer score (``eval/answers.py``) per kind, the dense model's beside it."""
    from rich.table import Table

    dense = "reference_correct" in answers
    heading = f"{answers_line(answers)}, greedy, {answers['max_new_tokens']} tokens: {title}"
    table = Table(title=heading, min_width=len(heading))
    for col in ("kind", "correct", *(["dense correct"] if dense else [])):
        table.add_column(col)
    rows = [*answers["by_kind"].items(), ("all", answers)]
    for kind, k in rows:
        n = k.get("items")
        table.add_row(kind, f"{k['correct']}/{n}", *([f"{k['reference_correct']}/{n}"] if dense else []),
                      style="bold" if k is answers else None)
    return table
