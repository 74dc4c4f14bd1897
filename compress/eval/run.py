"""``lrc eval``: perplexity on named or local sets, and KL/agreement to a dense reference, as one JSON result."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..models import is_lrc_checkpoint, load_model
from .data import load_eval_text
from .kl import kl_to_reference
from .perplexity import perplexity_of_ids, tokenize


def effective_seq_len(model, seq_len: int) -> int:
    """``seq_len`` capped by the model's context (``max_position_embeddings``)."""
    ctx = getattr(model.config, "max_position_embeddings", None)
    return min(seq_len, ctx) if ctx else seq_len


def protocol(seq_len: int, stride: int | None, bos: bool, res) -> str:
    windows = (f"sliding windows (stride {stride})" if stride and stride != seq_len else "non-overlapping windows")
    return (f"rows joined with '\\n\\n', tokenized once without special tokens; {windows} of {seq_len} tokens"
            f"{' after a BOS token' if bos else ''}; token-weighted mean NLL over {res.tokens} scored tokens in "
            f"{res.windows} windows; exp")


def evaluate(model_spec: str, ppl: list[str], seq_len: int = 2048, stride: int | None = None,
             max_windows: int | None = None, bos: bool = False, reference: str | None = None,
             batch_size: int = 4, dtype: str = "float32") -> dict:
    model, tokenizer, path = load_model(model_spec, dtype)
    ref = load_model(reference, dtype)[0] if reference else None
    L = effective_seq_len(model, seq_len)
    bos_id = tokenizer.bos_token_id if bos else None
    out = {"model": model_spec, "reference": reference, "perplexity": {}, "kl": {}}
    for source in ppl:
        t0 = time.perf_counter()
        ids = tokenize(tokenizer, load_eval_text(source))
        res = perplexity_of_ids(model, ids, L, stride, max_windows, batch_size, bos_id)
        out["perplexity"][source] = {
            **res.to_dict(), "dataset": source, "seconds": round(time.perf_counter() - t0, 2),
            "protocol": protocol(L, stride, bos, res)}
        if ref is not None:
            out["kl"][source] = kl_to_reference(model, ref, ids, L, stride, max_windows, batch_size,
                                                bos_id).to_dict()
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
    tmp = report_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(report_path)


def results_table(results: dict):
    from rich.table import Table

    table = Table(title=f"lrc eval: {results['model']}")
    for col in ("dataset", "perplexity", "seq_len", "windows", "tokens", "KL(dense‖model)", "top-1 agree"):
        table.add_column(col)
    for name, r in results["perplexity"].items():
        kl = results["kl"].get(name)
        table.add_row(name, f"{r['perplexity']:.4f}", str(r["seq_len"]), str(r["windows"]), f"{r['tokens']:,}",
                      f"{kl['kl']:.5f}" if kl else "–", f"{kl['top1_agreement']:.4f}" if kl else "–")
    return table




def bench(model_spec: str, reference: str | None = None, seq_lens=(128, 512), decode_batches=(1, 8),
          decode_tokens: int = 32, repeats: int = 5, device: str = "auto", dtype: str = "float32") -> dict:
    """Measure MODEL (and REFERENCE, in the same process, on the same inputs) with ``eval.bench``."""
    from ..engine.pipeline import resolve_device
    from .bench import describe, measure

    dev = resolve_device(device)
    results = {"device": str(dev), "torch_threads": torch.get_num_threads(), "repeats": repeats,
               "decode_tokens": decode_tokens, "models": {}}
    for role, spec in (("reference", reference), ("model", model_spec)):
        if spec is None:
            continue
        model, _, path = load_model(spec, dtype)
        model.to(dev)
        results["models"][role] = {"name": spec, **describe(model, path),
                                   **measure(model, seq_lens, decode_batches, decode_tokens, repeats)}
        del model
    if reference:
        m, r = results["models"]["model"], results["models"]["reference"]
        results["flop_ideal_speedup"] = r["linear_macs_per_token"] / m["linear_macs_per_token"]
        results["measured_speedup"] = {
            f"prefill@{L}": m["prefill_tokens_per_s"][L] / r["prefill_tokens_per_s"][L] for L in seq_lens}
        results["measured_speedup"].update({
            f"decode@b{b}": m["decode_tokens_per_s"][b] / r["decode_tokens_per_s"][b] for b in decode_batches})
    return results


def bench_table(results: dict):
    from rich.table import Table

    models = results["models"]
    table = Table(title=f"lrc bench on {results['device']} ({results['torch_threads']} threads, median of "
                        f"{results['repeats']})")
    table.add_column("")
    for role in models:
        table.add_column(f"{role}: {models[role]['name']}")
    first = next(iter(models.values()))
    rows = [("params (total)", lambda d: f"{d['params_total']:,}"),
            ("params (block Linears)", lambda d: f"{d['params_block_linears']:,}"),
            ("checkpoint on disk", lambda d: f"{d['checkpoint_bytes'] / 2**20:.1f} MiB" if d["checkpoint_bytes"]
             else "–"),
            ("weights in memory", lambda d: f"{d['weights_gib']:.3f} GiB")]
    rows += [(f"prefill tok/s @ {L}", lambda d, L=L: f"{d['prefill_tokens_per_s'][L]:.0f}")
             for L in first["prefill_tokens_per_s"]]
    rows += [(f"decode tok/s @ batch {b}", lambda d, b=b: f"{d['decode_tokens_per_s'][b]:.1f}")
             for b in first["decode_tokens_per_s"]]
    if "peak_device_memory_gib" in first:
        rows.append(("peak device memory", lambda d: f"{d['peak_device_memory_gib']:.2f} GiB"))
    for label, fmt in rows:
        table.add_row(label, *(fmt(d) for d in models.values()))
    if "flop_ideal_speedup" in results:
        table.add_row("FLOP-ideal speed-up", "", f"{results['flop_ideal_speedup']:.3f}x")
        for k, v in results["measured_speedup"].items():
            table.add_row(f"measured speed-up {k}", "", f"{v:.3f}x")
    return table
