"""Fine-tuning a model: load, train the chosen parameters, write the checkpoint (the package docstring has the whole
story; ``config.py`` the options, ``loop.py`` the training loop)."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from .config import FinetuneConfig

__all__ = ["FinetuneConfig", "finetune", "run_state", "train_model"]


def state_dir(key: str, cfg: FinetuneConfig) -> Path:
    """Where an interrupted run's training state waits for ``--resume``: one per ``key`` (what identifies the run:
    its output directory, resolved) and configuration."""
    from ..models import cache_root

    unset = {"selfgen_prompts"} if cfg.selfgen_prompts is None else None  # as before it existed (same states)
    digest = hashlib.sha256(f"{key}|{cfg.model_dump_json(exclude=unset)}".encode()).hexdigest()[:16]
    return cache_root() / "finetune" / digest


def run_state(model_path: str | Path, out: str | Path, cfg: FinetuneConfig) -> Path:
    """The state directory of ``lrc finetune MODEL --out OUT``: keyed by the output and the input (both resolved) and
    the configuration, so that two runs to different outputs never share a state, nor does the first to finish
    remove the other's (issue 22; it was keyed by the input alone)."""
    return state_dir(f"{Path(model_path).resolve()}|out={Path(out).resolve()}", cfg)


def source_model(path: Path) -> str | None:
    """The model an lrc checkpoint was compressed from, as its report records it (None when unknown)."""
    rep = Path(path) / "lrc_report.json"
    return json.loads(rep.read_text()).get("model") if rep.is_file() else None


def _windows(tokenizer, cfg: FinetuneConfig, teacher):
    from ..calibration import calibration_tokens
    from ..models import cache_root
    from ..recipe import CalibrationConfig
    from .data import packed_windows

    if cfg.data != "selfgen":
        return packed_windows(tokenizer, cfg.data, cfg.seq_len, cfg.max_windows)
    calib = CalibrationConfig(dataset="selfgen", samples=cfg.selfgen_samples, seq_len=cfg.seq_len, seed=cfg.seed,
                              selfgen_prompts=cfg.selfgen_prompts)
    return calibration_tokens(teacher, tokenizer, calib, cache_root())  # cached: a compress run's are reused


def streamed_teacher(spec: str, dtype: str):
    """The dense teacher as a meta-device skeleton whose decoder blocks are read from its safetensors one at a time
    for each forward and given back after it (``engine/lazy.py``, ``LazyBlocks.stream``): the distillation's logits
    are the whole model's, bit for bit, while the teacher holds one block, its embeddings and its head instead of
    all of it (issue 22: the fine-tune's peak memory). None where the model is not a local safetensors directory."""
    from ..engine.lazy import lazy_model
    from ..models import DTYPES, resolve_model_path

    loaded = lazy_model(resolve_model_path(spec), DTYPES[dtype])
    if loaded is None:
        return None
    teacher, lazy = loaded
    lazy.stream()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def train_model(model, tokenizer, cfg: FinetuneConfig, device, state: Path, teacher_spec: str | None = None,
                resume: bool = False, log=None, stop_at: int | None = None, dtype: str = "float32",
                windows=None) -> dict:
    """Train ``model`` in place as ``cfg`` says; return the training record for the report (``{"interrupted_at":
    step}`` when ``stop_at`` ended it early). ``teacher_spec``: the dense model (``cfg.teacher`` wins), needed by
    ``loss: distill`` and ``data: selfgen``. ``windows``: the packed text when the caller has it already."""
    from ..errors import LrcError
    from ..models import load_model
    from .data import split
    from .loop import held_out_loss, train
    from .params import select

    teacher = None
    if cfg.data != "selfgen" and windows is None:  # a bad file fails in a second, before the teacher loads
        windows = _windows(tokenizer, cfg, None)
    if cfg.loss == "distill" or cfg.data == "selfgen":
        spec = cfg.teacher or teacher_spec
        if spec is None:
            raise LrcError(f"finetune.teacher: {'loss distill' if cfg.loss == 'distill' else 'data selfgen'} needs "
                           "the dense model and none is recorded; give --teacher")
        teacher = load_model(spec, dtype)[0].to(device)
        for p in teacher.parameters():
            p.requires_grad_(False)
    if cfg.data == "selfgen":
        windows = _windows(tokenizer, cfg, teacher)
    if cfg.loss != "distill":
        teacher = None
    elif torch.device(device).type == "cpu":  # the teacher's blocks one at a time from here on (same logits)
        teacher = streamed_teacher(cfg.teacher or teacher_spec, dtype) or teacher
    train_windows, held = split(windows, cfg.holdout, cfg.seed, cfg.data)
    trained = select(model, cfg.train)
    model.to(device)
    t0 = time.perf_counter()
    before = held_out_loss(model, held, cfg.batch_size, device)
    state.mkdir(parents=True, exist_ok=True)
    record = train(model, trained, train_windows, held, cfg, device, state, resume, log, stop_at, teacher=teacher)
    if "interrupted_at" in record:
        return record
    after = held_out_loss(model, held, cfg.batch_size, device)
    n_trained = sum(p.numel() for p in trained.values())
    n_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for p in model.parameters():
        p.requires_grad_(False)
    return {"config": cfg.recorded(), "teacher": (cfg.teacher or teacher_spec) if teacher is not None or
            cfg.data == "selfgen" else None, "train_windows": int(train_windows.shape[0]),
            "held_out_windows": int(held.shape[0]), "trained_params": n_trained, "total_params": n_total,
            "optimizer_state_params": 2 * n_trained, "held_out_loss_before": before, "held_out_loss_after": after,
            "seconds": round(time.perf_counter() - t0, 2), "device": str(device), **record}


def finetune(model_spec: str, cfg: FinetuneConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
             device: str = "auto", log=None, stop_at: int | None = None) -> dict:
    """Fine-tune MODEL (an lrc checkpoint; with ``train: all`` any model) and write it to ``out``. Returns the
    report. ``log(step, loss, held_out, tokens_per_s)`` after every step; ``stop_at``: end after that step without
    writing (the resumable state stays), as a crash would."""
    from ..checkpoint.load import read_config
    from ..checkpoint.save import save_checkpoint
    from ..engine.device import resolve_device
    from transformers import AutoTokenizer

    from ..errors import LrcError
    from ..models import is_lrc_checkpoint, load_model, resolve_model_path
    from ..output import atomic_dir, check_out
    from ..report import peak_rss_gib, write_report

    out = Path(out)
    check_out(out, overwrite)
    dev = resolve_device(device)
    path = resolve_model_path(model_spec)
    lrc = is_lrc_checkpoint(path)
    try:
        if lrc:
            from ..checkpoint.load import load_config

            load_config(path)  # registers lrc's config class: the tokenizer reads config.json without remote code
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise LrcError(f"{model_spec}: cannot load its tokenizer ({str(err).splitlines()[0]})") from None
    windows = _windows(tokenizer, cfg, None) if cfg.data != "selfgen" else None  # bad text fails before the model
    if windows is not None:
        from .data import resolve_holdout

        resolve_holdout(windows.shape[0], cfg.holdout, cfg.data, cfg.seq_len)  # so does text too short to split
    model = load_model(model_spec)[0]
    state = run_state(path, out, cfg)
    record = train_model(model, tokenizer, cfg, dev, state, source_model(path) if lrc else model_spec, resume, log,
                         stop_at, windows=windows)
    if "interrupted_at" in record:
        return record
    report = json.loads((Path(path) / "lrc_report.json").read_text()) if lrc and \
        (Path(path) / "lrc_report.json").is_file() else {"modules": []}
    report["finetune"] = {"from": model_spec, **record}
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
    shutil.rmtree(state, ignore_errors=True)
    return report
