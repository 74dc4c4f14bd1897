"""The on-disk format: safetensors weights + ``config.json`` (``model_type: "lrc"``, ``lrc`` section, ``auto_map``
to ``modeling_lrc.py``)."""
from .load import load, load_config, read_config
from .save import save_checkpoint

__all__ = ["load", "load_config", "read_config", "save_checkpoint"]
