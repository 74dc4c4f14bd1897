"""Write a compressed model as a ``save_pretrained`` directory that reloads anywhere.

``config.json`` gets ``lrc = {format_version, base_architecture, modules}`` and
``auto_map = {"AutoModelForCausalLM": "modeling_lrc.LrcForCausalLM"}``; ``modeling_lrc.py`` is copied beside it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .modeling_lrc import LRC_FORMAT_VERSION

MODELING_FILE = Path(__file__).with_name("modeling_lrc.py")


def save_checkpoint(model, tokenizer, directory: str | Path) -> None:
    """``model.config.lrc`` (set by ``compress_model``) describes the replaced modules."""
    directory = Path(directory)
    base = type(model).__name__
    lrc = getattr(model.config, "lrc", None)
    if not isinstance(lrc, dict) or "modules" not in lrc:
        raise ValueError("model.config.lrc is missing: compress the model with lrc before saving it")
    model.config.lrc = {**lrc, "format_version": LRC_FORMAT_VERSION, "base_architecture": base}
    model.config.auto_map = {"AutoModelForCausalLM": "modeling_lrc.LrcForCausalLM"}
    model.config.architectures = [base]
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    shutil.copyfile(MODELING_FILE, directory / "modeling_lrc.py")
