"""Load an lrc checkpoint without remote code (the same loader the checkpoint carries, imported from lrc)."""
from __future__ import annotations

from pathlib import Path

from ..errors import LrcError
from .modeling_lrc import LrcForCausalLM


def load(path: str | Path, dtype: str | None = None, **kwargs):
    """Load a compressed model saved by lrc. ``dtype`` overrides the saved dtype ("float32", "bfloat16", ...)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LrcError(f"{path}: not a checkpoint directory (no config.json)")
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = LrcForCausalLM.from_pretrained(str(path), **kwargs)
    except ValueError as err:
        raise LrcError(f"{path}: {err}") from None
    return model.eval()
