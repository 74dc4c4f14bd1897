"""Write a compressed model as a ``save_pretrained`` directory that reloads anywhere.

``config.json`` gets ``model_type: "lrc"`` (so plain transformers refuses it without ``trust_remote_code=True``
instead of silently building the dense base model), ``lrc = {format_version, base_model_type, base_architecture,
modules}`` and ``auto_map`` to the classes of ``modeling_lrc.py``, which is copied beside it.
"""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

from ..output import normalize_modes
from .modeling_lrc import AUTO_MAP, LRC_FORMAT_VERSION

MODELING_FILE = Path(__file__).with_name("modeling_lrc.py")
# the checkpoint's remote code: the entry file and the modules it imports relatively
REMOTE_CODE = [MODELING_FILE, *(MODELING_FILE.with_name(f"{n}.py") for n in ("lrc_layers", "lrc_attention",
                                                                             "lrc_fast"))]


def base_of(model) -> tuple[str, str]:
    """``(base_model_type, base_architecture)`` of a causal LM compressed in memory (still of its base class) or
    loaded from an lrc checkpoint (a subclass of its base class, with the base model type in its config)."""
    config = model.config
    if config.model_type != "lrc":
        return config.model_type, type(model).__name__
    # compress_model rewrites config.lrc when it compresses a loaded checkpoint further: ask the classes first
    base_type = getattr(type(config), "_lrc_base_type", None) or config.lrc["base_model_type"]
    base = getattr(type(model), "_lrc_base", None)
    return base_type, base.__name__ if base else config.lrc["base_architecture"]


def lrc_config_dict(config: dict, base_model_type: str, base_architecture: str) -> dict:
    """``config.json`` as ``save_pretrained`` wrote it (the base model type for a model compressed in memory) -> the
    current lrc format."""
    section = {**config["lrc"], "format_version": LRC_FORMAT_VERSION, "base_model_type": base_model_type,
               "base_architecture": base_architecture}
    return {**config, "model_type": "lrc", "architectures": ["LrcForCausalLM"], "auto_map": dict(AUTO_MAP),
            "lrc": section}


def _prepare(model) -> tuple[str, str, dict]:
    lrc = getattr(model.config, "lrc", None)
    if not isinstance(lrc, dict) or "modules" not in lrc:
        raise ValueError("model.config.lrc is missing: compress the model with lrc before saving it")
    base_type, base_arch = base_of(model)
    model.config.lrc = {**lrc, "format_version": LRC_FORMAT_VERSION, "base_model_type": base_type,
                        "base_architecture": base_arch}
    return base_type, base_arch, lrc


def _finish(model, tokenizer, directory: Path, base_type: str, base_arch: str, lrc: dict) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(lrc_config_dict(json.loads(path.read_text()), base_type, base_arch), indent=2,
                               sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    for path in REMOTE_CODE:
        shutil.copyfile(path, directory / path.name)
    normalize_modes(directory)


def save_checkpoint(model, tokenizer, directory: str | Path) -> None:
    """``model.config.lrc`` (set by ``compress_model``) describes the replaced modules."""
    directory = Path(directory)
    base_type, base_arch, lrc = _prepare(model)
    # the weights as they are in memory: transformers would otherwise convert some (fused MoE experts) back to the
    # base model type's legacy layout, which only its own loader converts again, and lrc's model type is not that
    import inspect

    as_in_memory = "save_original_format" in inspect.signature(model.save_pretrained).parameters
    model.save_pretrained(directory, **({"save_original_format": False} if as_in_memory else {}))
    _finish(model, tokenizer, directory, base_type, base_arch, lrc)


def save_checkpoint_streamed(model, tokenizer, directory: str | Path, blocks, max_shard_bytes: int | None = None
                             ) -> None:
    """Like ``save_checkpoint``, with the decoder blocks' tensors coming from ``blocks`` (``shards.Source``s: the run
    cache's block files, read one tensor at a time) instead of ``model``, whose blocks may be on the meta device. What ``save_pretrained`` writes besides the weights is written the same way (config with
    ``dtype`` and ``architectures``, generation config); weights go in shards (``shards.py``)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from ..plan import find_blocks
    from .shards import memory_source, write_shards

    directory = Path(directory)
    base_type, base_arch, lrc = _prepare(model)
    prefix = find_blocks(model)[0] + "."
    outside = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    outside = remove_tied_weights_from_state_dict(outside, model)  # the head tied to the embeddings: stored once
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
    write_shards(directory, itertools.chain([memory_source(outside)], blocks), max_shard_bytes)
    _finish(model, tokenizer, directory, base_type, base_arch, lrc)
