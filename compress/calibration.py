"""Calibration text → fixed-length token windows, cached on disk.

Sources: a named set from ``calib/*.yaml`` (hub dataset id, config, split, text field), a local ``.txt`` / ``.jsonl`` /
``.parquet`` file, or ``selfgen`` (text sampled from the model itself, as ASVD offers; needs no data at all).
Rows are joined with "\\n\\n" and tokenized once without special tokens; ``samples`` non-overlapping windows of
``seq_len`` tokens are drawn at random window slots with ``seed``. Too little text is an error, not a silent repeat.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .errors import LrcError
from .recipe import CalibrationConfig

CALIB_DIR = Path(os.environ.get("LRC_CALIB_DIR", Path(__file__).resolve().parent.parent / "calib"))
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def named_sets() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted(CALIB_DIR.glob("*.yaml"))}


def rows_from_file(path: Path, field: str | None) -> list[str]:
    if not path.is_file():
        raise LrcError(f"{path}: calibration file not found")
    try:
        if path.suffix == ".txt":
            return [path.read_text(encoding="utf-8")]
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            records = table.to_pylist()
        else:
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise LrcError(f"{path}: cannot read calibration text ({err})") from None
    field = field or "text"
    if not records or not isinstance(records[0], dict) or field not in records[0]:
        keys = sorted(records[0]) if records and isinstance(records[0], dict) else []
        raise LrcError(f"{path}: no field {field!r} in the records (fields: {keys}); set calibration.text_field")
    return [str(r[field]) for r in records]


def rows_from_hub(name: str, spec: dict, keep_empty: bool = False) -> list[str]:
    from datasets import load_dataset

    kwargs = {k: spec[k] for k in ("name", "data_files") if k in spec}
    try:
        ds = load_dataset(spec["path"], split=spec.get("split", "train"), **kwargs)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "cannot get it"
        raise LrcError(f"calibration set {name!r} (hub dataset {spec['path']}) could not be loaded: "
                       f"{str(err).splitlines()[0][:160]}; offline? pass a local .jsonl/.txt file instead") from None
    return [r for r in ds[spec.get("text_field", "text")] if r or keep_empty]


def describe_source(cfg: CalibrationConfig) -> str:
    """A stable identifier of the calibration text (for cache keys and the report)."""
    src = cfg.dataset
    if src.endswith(LOCAL_SUFFIXES):
        p = Path(src)
        st = p.stat() if p.is_file() else None
        return f"file:{p.resolve()}:{st.st_size if st else 0}:{st.st_mtime_ns if st else 0}"
    return f"set:{src}"


def load_rows(cfg: CalibrationConfig) -> list[str]:
    src = cfg.dataset
    if src.endswith(LOCAL_SUFFIXES):
        return rows_from_file(Path(src), cfg.text_field)
    sets = named_sets()
    if src not in sets:
        raise LrcError(f"calibration.dataset: unknown set {src!r}; use one of {sorted(sets) + ['selfgen']} "
                       f"or a local {'/'.join(LOCAL_SUFFIXES)} file")
    return rows_from_hub(src, sets[src])


def windows_from_ids(ids: torch.Tensor, samples: int, seq_len: int, seed: int, source: str) -> torch.Tensor:
    """``samples`` distinct non-overlapping windows of ``seq_len`` tokens, chosen at random slots with ``seed``."""
    slots = ids.numel() // seq_len
    if slots < samples:
        raise LrcError(f"calibration text {source} has {ids.numel()} tokens: too little for {samples} samples x "
                       f"{seq_len} tokens (needs {samples * seq_len}); lower calibration.samples/seq_len or add text")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=g)[:samples].sort().values
    return ids[: slots * seq_len].view(slots, seq_len)[chosen].clone()


def selfgen(model, tokenizer, cfg: CalibrationConfig, batch_size: int) -> torch.Tensor:
    """Sample ``samples`` sequences of ``seq_len`` tokens from the model itself, starting at BOS (seeded)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(cfg.seed)
    out = []
    for i in range(0, cfg.samples, batch_size):
        n = min(batch_size, cfg.samples - i)
        prompt = torch.full((n, 1), start, dtype=torch.long, device=model.device)
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, top_p=1.0,
                             max_new_tokens=cfg.seq_len - 1, min_new_tokens=cfg.seq_len - 1,
                             pad_token_id=tokenizer.eos_token_id)
        out.append(gen[:, : cfg.seq_len].cpu())
    return torch.cat(out)


def calibration_tokens(model, tokenizer, cfg: CalibrationConfig, cache_dir: Path, batch_size: int = 8):
    """Token windows ``(samples, seq_len)`` for ``cfg``, cached under ``cache_dir/tokens`` by a fingerprint."""
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:12]
    source = describe_source(cfg)
    model_id = getattr(model.config, "_name_or_path", "") if cfg.dataset == "selfgen" else ""
    key = hashlib.sha256(f"{source}|{vocab}|{cfg.samples}|{cfg.seq_len}|{cfg.seed}|{cfg.text_field}|{model_id}"
                         .encode()).hexdigest()[:16]
    path = cache_dir / "tokens" / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)["ids"]
    if cfg.dataset == "selfgen":
        ids = selfgen(model, tokenizer, cfg, batch_size)
    else:
        rows = load_rows(cfg)
        text = "\n\n".join(r for r in rows if r.strip())
        if not text.strip():
            raise LrcError(f"{cfg.dataset}: calibration text is empty")
        flat = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
        ids = windows_from_ids(flat, cfg.samples, cfg.seq_len, cfg.seed, cfg.dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"ids": ids.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return ids
