"""``lrc finetune``: recovery training of a compressed checkpoint (issue 14; WeLore's LRC-only fine-tuning, methods.md
§3b; SVD-LLM's factor update, §4). ``finetune(checkpoint, cfg, out)`` loads the model, trains the chosen parameters
on packed windows of local text (``loop.train``) and writes a checkpoint of the same structure to ``out``
(atomically), its report carrying the training record (data, steps, tokens, loss curve, held-out loss before and
after, trained parameters, peak memory)."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from .config import FinetuneConfig

__all__ = ["FinetuneConfig", "finetune"]


def _state_dir(path: str, cfg: FinetuneConfig) -> Path:
    """Where an interrupted run's training state waits for ``--resume``: one per checkpoint and configuration."""
    from ..models import cache_root

    key = hashlib.sha256(f"{Path(path).resolve()}|{cfg.model_dump_json()}".encode()).hexdigest()[:16]
    return cache_root() / "finetune" / key


def finetune(model_spec: str, cfg: FinetuneConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
             device: str = "auto", log=None, stop_at: int | None = None) -> dict:
    """Fine-tune MODEL (an lrc checkpoint; with ``train: all`` any model) and write it to ``out``. Returns the
    report. ``log(step, loss, held_out, tokens_per_s)`` after every step; ``stop_at``: end after that step without
    writing (the resumable state stays), as a crash would."""
    from ..checkpoint.load import read_config
    from ..checkpoint.save import save_checkpoint
    from ..engine.pipeline import resolve_device
    from transformers import AutoTokenizer

    from ..errors import LrcError
    from ..models import is_lrc_checkpoint, load_model, resolve_model_path
    from ..output import atomic_dir, check_out
    from ..report import peak_rss_gib, write_report
    from .data import packed_windows, split
    from .loop import held_out_loss, train
    from .params import select

    out = Path(out)
    check_out(out, overwrite)
    dev = resolve_device(device)
    path = resolve_model_path(model_spec)
    try:  # the data is checked before the model loads: a bad file fails in a second
        if is_lrc_checkpoint(path):
            from ..checkpoint.load import load_config

            load_config(path)  # registers lrc's config class: the tokenizer reads config.json without remote code
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise LrcError(f"{model_spec}: cannot load its tokenizer ({str(err).splitlines()[0]})") from None
    windows = packed_windows(tokenizer, cfg.data, cfg.seq_len, cfg.max_windows)
    train_windows, held = split(windows, cfg.holdout, cfg.seed)
    model = load_model(model_spec)[0]
    trained = select(model, cfg.train)
    model.to(dev)
    t0 = time.perf_counter()
    before = held_out_loss(model, held, cfg.batch_size, dev)
    state_dir = _state_dir(path, cfg)
    state_dir.mkdir(parents=True, exist_ok=True)
    record = train(model, trained, train_windows, held, cfg, dev, state_dir, resume, log, stop_at)
    if "interrupted_at" in record:
        return record
    after = held_out_loss(model, held, cfg.batch_size, dev)
    n_trained = sum(p.numel() for p in trained.values())
    n_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lrc = is_lrc_checkpoint(path)
    report = json.loads((Path(path) / "lrc_report.json").read_text()) if lrc and \
        (Path(path) / "lrc_report.json").is_file() else {"modules": []}
    report["finetune"] = {
        "from": model_spec, "config": cfg.model_dump(), "train_windows": int(train_windows.shape[0]),
        "held_out_windows": int(held.shape[0]), "trained_params": n_trained, "total_params": n_total,
        "optimizer_state_params": 2 * n_trained, "held_out_loss_before": before, "held_out_loss_after": after,
        "seconds": round(time.perf_counter() - t0, 2), "device": str(dev), **record}
    model.cpu()
    with atomic_dir(out, overwrite) as tmp:
        if lrc:
            save_checkpoint(model, tokenizer, tmp)
            read_config(tmp)  # the written config must load
        else:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        report["finetune"]["peak_rss_gib"] = round(peak_rss_gib(), 3)
        write_report(tmp, report)
    shutil.rmtree(state_dir, ignore_errors=True)
    return report
