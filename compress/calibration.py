"""Calibration text → fixed-length token windows, cached on disk.

Sources: a named set from ``calib/*.yaml`` (hub dataset id, config, split, text field), a local ``.txt`` / ``.jsonl`` /
``.parquet`` file, or ``selfgen`` (text sampled from the model itself, as ASVD offers; needs no data at all).
Records become text by a ``format`` (a text field, or ARC questions with their answers for task calibration); rows
are joined with "\\n\\n" and tokenized once without special tokens; ``samples`` non-overlapping windows of
``seq_len`` tokens are drawn at random window slots with ``seed``. Too little text is an error, not a silent repeat.
A ``mix`` of sources shares the windows by weight.
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
from .models import model_context
from .recipe import CalibrationConfig, CalibrationSource
from .selfgen import chat_rows, selfgen  # noqa: F401  (selfgen: lrc's public name for it)

CALIB_DIR = Path(os.environ.get("LRC_CALIB_DIR", Path(__file__).resolve().parent.parent / "calib"))
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def named_sets() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted(CALIB_DIR.glob("*.yaml"))}


def arc_text(rec: dict) -> str:
    """An ARC record as lm-eval's arc prompt plus its answer: ``Question: <stem>\nAnswer: <correct choice>``.
    Reads ARC's own layout (``question.stem``, ``question.choices``) and the hub's (``question``, ``choices``)."""
    q = rec["question"]
    stem, choices = (q["stem"], q["choices"]) if isinstance(q, dict) else (q, rec["choices"])
    if isinstance(choices, dict):  # hub layout: {"text": [...], "label": [...]}
        choices = [{"text": t, "label": lab} for t, lab in zip(choices["text"], choices["label"])]
    answer = next((c["text"] for c in choices if c["label"] == rec["answerKey"]), None)
    return f"Question: {stem}\nAnswer: {answer}" if answer is not None else f"Question: {stem}"


def _is_arc(rec: dict) -> bool:
    return "answerKey" in rec and "question" in rec


def format_records(records: list, field: str | None, fmt: str, source: str) -> list[str]:
    """Records → texts by ``fmt`` (text: ``field``; arc: ``arc_text``; auto: the field if present, else arc)."""
    if not records or not isinstance(records[0], dict):
        raise LrcError(f"{source}: no records to read calibration text from")
    first = records[0]
    if fmt == "auto":
        fmt = "text" if (field or "text") in first or not _is_arc(first) else "arc"
    if fmt == "arc":
        if not _is_arc(first):
            raise LrcError(f"{source}: format arc needs 'question' and 'answerKey' fields (fields: {sorted(first)})")
        return [arc_text(r) for r in records]
    field = field or "text"
    if field not in first:
        raise LrcError(f"{source}: no field {field!r} in the records (fields: {sorted(first)}); set "
                       "calibration.text_field (or format: arc for ARC-style questions)")
    return [str(r[field]) for r in records]


def rows_from_file(path: Path, field: str | None, fmt: str = "auto") -> list[str]:
    if not path.is_file():
        raise LrcError(f"{path}: calibration file not found")
    try:
        if path.suffix == ".txt":
            return [path.read_text(encoding="utf-8")]
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            records = pq.read_table(path).to_pylist()
        else:
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise LrcError(f"{path}: cannot read calibration text ({err})") from None
    return format_records(records, field, fmt, str(path))


def rows_from_hub(name: str, spec: dict, keep_empty: bool = False) -> list[str]:
    from datasets import load_dataset

    kwargs = {k: spec[k] for k in ("name", "data_files") if k in spec}
    try:
        ds = load_dataset(spec["path"], split=spec.get("split", "train"), **kwargs)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "cannot get it"
        raise LrcError(f"calibration set {name!r} (hub dataset {spec['path']}) could not be loaded: "
                       f"{str(err).splitlines()[0][:160]}; offline? pass a local .jsonl/.txt file instead") from None
    if spec.get("format", "text") != "text":
        return format_records(list(ds), spec.get("text_field"), spec["format"], name)
    return [r for r in ds[spec.get("text_field", "text")] if r or keep_empty]


def describe_source(src: CalibrationSource) -> str:
    """A stable identifier of one source's text (for cache keys and the report)."""
    if src.dataset.endswith(LOCAL_SUFFIXES):
        p = Path(src.dataset)
        st = p.stat() if p.is_file() else None
        where = f"file:{p.resolve()}:{st.st_size if st else 0}:{st.st_mtime_ns if st else 0}"
    else:
        where = f"set:{src.dataset}"
    return f"{where}|{src.text_field}|{src.format}|{src.weight}"


def load_rows(src: CalibrationSource) -> list[str]:
    if src.dataset.endswith(LOCAL_SUFFIXES):
        return rows_from_file(Path(src.dataset), src.text_field, src.format)
    sets = named_sets()
    if src.dataset not in sets:
        raise LrcError(f"calibration.dataset: unknown set {src.dataset!r}; use one of {sorted(sets) + ['selfgen']} "
                       f"or a local {'/'.join(LOCAL_SUFFIXES)} file")
    return rows_from_hub(src.dataset, sets[src.dataset])


def check_source(source: str, field: str, split: str | None = None, extra: tuple[str, ...] = ()) -> None:
    """A one-line error naming ``field`` when ``source`` (a local text file or a calib/ set name, or one of
    ``extra``) does not exist, before any expensive work. ``split``: the set must have it (``eval`` for
    perplexity)."""
    if source.endswith(LOCAL_SUFFIXES):
        if not Path(source).is_file():
            raise LrcError(f"{field}: {source}: file not found")
        return
    sets = named_sets()
    known = sorted(k for k, v in sets.items() if split is None or split in v)
    if source not in extra and source not in known:
        raise LrcError(f"{field}: unknown {'evaluation ' if split == 'eval' else ''}set {source!r}; use one of "
                       f"{known + list(extra)} or a local file")


def shares(weights: list[float], samples: int) -> list[int]:
    """Split ``samples`` by ``weights`` (largest remainders; every part gets at least one window)."""
    total = sum(weights)
    exact = [w / total * samples for w in weights]
    out = [max(1, int(e)) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    k = 0
    while sum(out) < samples:
        out[order[k % len(order)]] += 1
        k += 1
    while sum(out) > samples:
        j = max((i for i in range(len(out)) if out[i] > 1), key=lambda i: out[i] - exact[i])
        out[j] -= 1
    return out


def check_context(model, recipe) -> None:
    """Refuse calibration windows longer than the model's context, before any work: past it positions are out of
    distribution, and the block forwards' attention memory grows with the square of the length (a run at 100000
    tokens grinds for minutes, then is killed for memory). Names the recipe field, or the stage's own set."""
    ctx = model_context(model.config)
    if ctx is None:
        return
    sets = [("calibration", recipe.calibration)] + [(f"stages[{i}].calibration", st.calibration)
                                                    for i, st in enumerate(recipe.stages) if st.calibration]
    for where, cfg in sets:
        if cfg.seq_len > ctx[1]:
            raise LrcError(f"{where}.seq_len: {cfg.seq_len} exceeds the model's context ({ctx[0]} {ctx[1]})")


def windows_from_ids(ids: torch.Tensor, samples: int, seq_len: int, seed: int, source: str) -> torch.Tensor:
    """``samples`` distinct non-overlapping windows of ``seq_len`` tokens, chosen at random slots with ``seed``."""
    slots = ids.numel() // seq_len
    if slots < samples:
        raise LrcError(f"calibration text {source} has {ids.numel()} tokens: too little for {samples} samples x "
                       f"{seq_len} tokens (needs {samples * seq_len}); lower calibration.samples/seq_len or add text")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=g)[:samples].sort().values
    return ids[: slots * seq_len].view(slots, seq_len)[chosen].clone()


def _windows(tokenizer, src: CalibrationSource, samples: int, cfg: CalibrationConfig) -> torch.Tensor:
    text = "\n\n".join(r for r in load_rows(src) if r.strip())
    if not text.strip():
        raise LrcError(f"{src.dataset}: calibration text is empty")
    flat = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    return windows_from_ids(flat, samples, cfg.seq_len, cfg.seed, src.dataset)


def calibration_tokens(model, tokenizer, cfg: CalibrationConfig, cache_dir: Path, batch_size: int = 8):
    """Token windows ``(samples, seq_len)`` for ``cfg``, cached under ``cache_dir/tokens`` by a fingerprint.
    A ``mix`` takes each source's share of the windows from that source, in the order listed."""
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:12]
    sources = cfg.sources()
    model_id = getattr(model.config, "_name_or_path", "") if cfg.dataset == "selfgen" and not cfg.mix else ""
    if model_id:  # inverse-CDF draws, in-place KV cache (tokens differ from earlier samplers'); chat rows
        model_id += f"|sampler 3|chat {chat_rows(tokenizer, cfg.samples, cfg.selfgen_chat)}"
        if cfg.selfgen_prompts is not None:  # the turns themselves (a file's content, not its name)
            from .selfgen import load_prompts

            turns = json.dumps(load_prompts(cfg.selfgen_prompts))
            model_id += f"|prompts {hashlib.sha256(turns.encode()).hexdigest()[:12]}"
    ident = ";".join(describe_source(s) for s in sources)
    key = hashlib.sha256(f"{ident}|{vocab}|{cfg.samples}|{cfg.seq_len}|{cfg.seed}|{model_id}"
                         .encode()).hexdigest()[:16]
    path = cache_dir / "tokens" / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)["ids"]
    if sources[0].dataset == "selfgen":
        ids = selfgen(model, tokenizer, cfg, batch_size)
    else:
        counts = shares([s.weight for s in sources], cfg.samples)
        ids = torch.cat([_windows(tokenizer, s, n, cfg) for s, n in zip(sources, counts)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"ids": ids.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return ids
