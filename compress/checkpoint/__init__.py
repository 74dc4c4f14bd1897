"""The on-disk format: safetensors weights + ``config.json`` (``model_type: "lrc"``, ``lrc`` section, ``auto_map``
to ``modeling_lrc.py``); the module types a checkpoint holds (``module_types.py``)."""
from .load import load, load_config, read_config
from .module_types import describe_spec
from .save import save_checkpoint

__all__ = ["describe_spec", "load", "load_config", "read_config", "save_checkpoint"]
