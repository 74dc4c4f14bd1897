"""Load an lrc checkpoint without remote code (the same loader the checkpoint carries, imported from lrc).

Checkpoints of an older format are migrated in memory; a newer format is refused with a one-line ``LrcError``.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LrcError
from .modeling_lrc import upgrade_section


def read_config(path: str | Path) -> dict:
    """``config.json`` of the checkpoint at ``path`` with its ``lrc`` section in the current format."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise LrcError(f"{path}: not a checkpoint directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    if not isinstance(cfg.get("lrc"), dict):
        raise LrcError(f"{path}: config.json has no 'lrc' section (not compressed by lrc)")
    try:
        return {**cfg, "lrc": upgrade_section(cfg["lrc"], cfg.get("model_type"))}
    except ValueError as err:
        raise LrcError(f"{path}: {err}") from None


def load_config(path: str | Path) -> LrcConfig:
    """The checkpoint's config as an ``LrcConfig`` (a subclass of its base config class), without remote code.

    It also registers lrc's own ``LrcConfig`` with ``AutoConfig`` in this process, so that transformers code that
    reads the checkpoint's config (``AutoTokenizer`` does) uses it instead of asking to trust the copy in the
    checkpoint."""
    from transformers import AutoConfig

    from .modeling_lrc import LrcConfig

    AutoConfig.register("lrc", LrcConfig, exist_ok=True)
    try:
        return LrcConfig.from_dict(read_config(path), name_or_path=str(path))
    except ValueError as err:
        raise LrcError(f"{path}: {err}") from None


def load(path: str | Path, dtype: str | None = None, **kwargs):
    """Load a compressed model saved by lrc. ``dtype`` overrides the saved dtype ("float32", "bfloat16", ...)."""
    from .modeling_lrc import LrcForCausalLM

    config = load_config(path)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = LrcForCausalLM.from_pretrained(str(path), config=config, **kwargs)
    except ValueError as err:
        raise LrcError(f"{path}: {err}") from None
    return model.eval()
