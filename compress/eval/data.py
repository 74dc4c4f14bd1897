"""Evaluation text: a named set from ``calib/*.yaml`` (its ``eval`` split, a hub dataset) or a local file."""
from __future__ import annotations

from pathlib import Path

from ..calibration import LOCAL_SUFFIXES, named_sets, rows_from_file, rows_from_hub
from ..errors import LrcError


def load_eval_text(source: str, text_field: str | None = None) -> str:
    """The evaluation text, rows joined with "\\n\\n" (a ``.txt`` file is used as it is)."""
    if source.endswith(LOCAL_SUFFIXES):
        rows = rows_from_file(Path(source), text_field)
        return rows[0] if source.endswith(".txt") else "\n\n".join(rows)
    sets = named_sets()
    if source not in sets or "eval" not in sets[source]:
        usable = sorted(k for k, v in sets.items() if "eval" in v)
        raise LrcError(f"--ppl: unknown evaluation set {source!r}; use one of {usable} or a local "
                       f"{'/'.join(LOCAL_SUFFIXES)} file")
    spec = {**{k: v for k, v in sets[source].items() if k not in ("eval", "data_files")}, **sets[source]["eval"]}
    # rows are joined as they come, empty ones included, as in the GPTQ / SVD-LLM evaluation code
    return "\n\n".join(rows_from_hub(source, spec, keep_empty=True))
