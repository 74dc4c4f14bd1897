"""``process_docs`` for lrc's local-file lm-eval tasks: map the local copies to the hub copies' field layout.

lm-eval imports this file by path from the materialised task directory, next to ``data_dir.txt`` (written by
``compress.eval.zeroshot.materialize``), which names the data directory the YAMLs point at.
"""
from __future__ import annotations

import os
from pathlib import Path


def _data_dir() -> Path:
    marker = Path(__file__).with_name("data_dir.txt")
    if marker.is_file():
        return Path(marker.read_text().strip())
    return Path(os.environ["LRC_DATA_DIR"])


def _labels(relpath: str, n: int) -> list[int]:
    path = _data_dir() / relpath
    labels = [int(x) for x in path.read_text().split()]
    if len(labels) != n:
        raise ValueError(f"{path}: {len(labels)} labels for {n} rows")
    return labels


def arc(dataset):
    """ARC V1 ``{"question": {"stem", "choices": [{"text", "label"}]}}`` → hub ``question`` + ``choices`` lists."""
    def convert(doc):
        q = doc["question"]
        return {"question": q["stem"], "choices": {"text": [c["text"] for c in q["choices"]],
                                                   "label": [c["label"] for c in q["choices"]]}}
    return dataset.map(convert)


def piqa(dataset):
    """PIQA keeps its gold answers in ``valid-labels.lst``, one per row of ``valid.jsonl``."""
    return dataset.add_column("label", _labels("piqa/valid-labels.lst", len(dataset)))


def winogrande(dataset):
    """``dev.jsonl`` already carries ``answer``; check it against ``dev-labels.lst`` so a stale copy fails loudly."""
    labels = _labels("winogrande/dev-labels.lst", len(dataset))
    if [int(a) for a in dataset["answer"]] != labels:
        raise ValueError("winogrande: dev.jsonl answers disagree with dev-labels.lst")
    return dataset


def hellaswag(dataset):
    """``{"query", "endings", "label"}`` → lm-eval's processed layout ``query`` / ``choices`` / ``gold``."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    return dataset.map(lambda d: {"query": preprocess(d["query"]), "choices": [preprocess(e) for e in d["endings"]],
                                  "gold": int(d["label"])})


def boolq(dataset):
    """BoolQ's ``answer`` (bool) → SuperGLUE's ``label`` (0 = no, 1 = yes)."""
    return dataset.map(lambda d: {"label": int(d["answer"])})
