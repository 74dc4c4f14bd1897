"""The on-disk format: safetensors weights + ``config.json`` ``lrc`` section + ``auto_map`` to ``modeling_lrc.py``."""
from .load import load
from .save import save_checkpoint

__all__ = ["load", "save_checkpoint"]
