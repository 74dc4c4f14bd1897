"""Zero-shot accuracy through lm-eval's Python API, on the model already in memory, with lrc's local-file tasks.

lrc ships lm-eval task YAMLs (``lm_eval_tasks/``) for the standard zero-shot suite of the compression papers
(ARC-e/c, PIQA, HellaSwag, WinoGrande, OpenBookQA, LAMBADA, BoolQ). They use lm-eval's prompts and metrics but read
local files (``dataset_path: json``/``text`` + ``data_files``; ``process_docs`` maps the fields to the hub layout).
``materialize`` writes a copy with the data directory filled in; the same directory works with lm-eval's own CLI:
``lm_eval --model hf --model_args pretrained=DIR --include_path <that dir> --tasks arc_easy``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import LrcError
from ..models import cache_root
from .tasks import TASKS

TEMPLATES = Path(__file__).with_name("lm_eval_tasks")
EXTRA_FILES = {"piqa": ["piqa/valid-labels.lst"], "winogrande": ["winogrande/dev-labels.lst"]}
PLACEHOLDER = "$LRC_DATA_DIR"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``--data-dir``, else ``$LRC_DATA_DIR``; one-line error if neither names a directory."""
    d = data_dir or os.environ.get("LRC_DATA_DIR")
    if not d:
        raise LrcError("--data-dir: zero-shot tasks read local files; pass --data-dir DIR or set LRC_DATA_DIR "
                       "(a directory with arc_easy/, piqa/, ... as described in the README)")
    if not Path(d).is_dir():
        raise LrcError(f"--data-dir: {d} is not a directory")
    return Path(d).resolve()


def required_files(task: str) -> list[str]:
    """Paths (relative to the data directory) a task reads: its ``data_files`` plus any labels file."""
    text = (TEMPLATES / f"{task}.yaml").read_text()
    return re.findall(re.escape(PLACEHOLDER) + r"/(\S+)", text) + EXTRA_FILES.get(task, [])


def check_tasks(tasks: list[str], data_dir: Path) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise LrcError(f"--tasks: unknown task(s) {unknown}; lrc ships {list(TASKS)}")
    for t in tasks:
        for rel in required_files(t):
            if not (data_dir / rel).is_file():
                raise LrcError(f"--tasks {t}: missing data file {data_dir / rel}")


def materialize(data_dir: Path) -> Path:
    """The task directory for ``data_dir``: templates with the placeholder replaced, cached by content."""
    h = hashlib.sha256(str(data_dir).encode())
    for f in sorted(TEMPLATES.iterdir()):
        if f.suffix in (".yaml", ".py"):
            h.update(f.name.encode() + f.read_bytes())
    target = cache_root() / "lm_eval_tasks" / h.hexdigest()[:16]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    for f in TEMPLATES.iterdir():
        if f.suffix == ".yaml":
            (tmp / f.name).write_text(f.read_text().replace(PLACEHOLDER, str(data_dir)))
        elif f.suffix == ".py":
            shutil.copy(f, tmp / f.name)
    (tmp / "data_dir.txt").write_text(str(data_dir))
    try:
        tmp.rename(target)
    except OSError:  # another process materialised it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def summarize(raw: dict, tasks: list[str]) -> dict:
    """lm-eval's results → ``{task: {acc, acc_stderr, acc_norm, ..., n}}`` plus the means, lm-eval's metric names."""
    per_task = {}
    for t in tasks:
        r = raw["results"][t]
        entry = {k.split(",")[0]: v for k, v in r.items() if "," in k and isinstance(v, (int, float))}
        entry["n"] = raw.get("n-samples", {}).get(t, {}).get("effective")
        per_task[t] = entry
    return {"tasks": per_task, "mean": mean_of(per_task)}


def mean_of(tasks: dict) -> dict:
    """Unweighted mean over tasks of acc and of acc_norm (over the tasks that report it), with the task counts."""
    mean = {}
    for metric in ("acc", "acc_norm"):
        vals = [e[metric] for e in tasks.values() if metric in e]
        if vals:
            mean[metric], mean[f"{metric}_tasks"] = sum(vals) / len(vals), len(vals)
    return mean


def request_cache_path(model) -> Path:
    """lm-eval's sqlite request cache for this model: one per weights fingerprint, never shared."""
    from ..engine.cache import model_fingerprint

    path = cache_root() / "lm_eval" / model_fingerprint(model)[:24]
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def zero_shot(model, tokenizer, tasks: list[str], data_dir: str | Path | None = None, limit: int | None = None,
              batch_size: int = 8, cache: bool = True, progress=None) -> dict:
    """Run lrc's tasks on ``model`` (already loaded) with ``lm_eval.simple_evaluate``; 0-shot, lm-eval defaults.

    The lm-eval request cache (``cache=True``) lives under ``$LRC_CACHE/lm_eval/<model fingerprint>`` so two
    different models never share answers. Tasks run one ``simple_evaluate`` each (0-shot: the same numbers) so that
    ``progress`` (``compress.progress.Progress``) can show which task runs, and log a line per task.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    d = resolve_data_dir(data_dir)
    check_tasks(tasks, d)
    include = materialize(d)
    use_cache = str(request_cache_path(model)) if cache else None
    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    lm_logger.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        manager = TaskManager(include_path=str(include), include_defaults=False)
        raw: dict = {"results": {}, "n-samples": {}}
        for task in tasks:
            if progress is not None:
                progress.phase(f"zero-shot {task}")
            one = simple_evaluate(model=lm, tasks=[task], limit=limit, use_cache=use_cache, log_samples=False,
                                  task_manager=manager, bootstrap_iters=1000, verbosity="ERROR")
            raw["results"].update(one["results"])
            raw["n-samples"].update(one.get("n-samples", {}))
    finally:
        lm_logger.setLevel(level)
    out = summarize(raw, list(tasks))
    out.update({"limit": limit, "num_fewshot": 0, "batch_size": batch_size, "data_dir": str(d),
                "include_path": str(include), "lm_eval_version": _lm_eval_version()})
    return out


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
