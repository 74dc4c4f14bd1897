"""Write a compressed model as a ``save_pretrained`` directory that reloads anywhere.

``config.json`` gets ``model_type: "lrc"`` (so plain transformers refuses it without ``trust_remote_code=True``
instead of silently building the dense base model), ``lrc = {format_version, base_model_type, base_architecture,
modules}`` and ``auto_map`` to the classes of ``modeling_lrc.py``, which is written beside it with the rest of the
checkpoint's remote code (``remote_code``).
"""
from __future__ import annotations

import ast
import itertools
import json
import re
import sys
from pathlib import Path

from ..output import normalize_modes
from .modeling_lrc import AUTO_MAP, LRC_FORMAT_VERSION
from .module_types import CORE_DIR, used_types

# in every checkpoint, beside the generated lrc_types.py: the entry file and the core files it imports relatively
CORE_FILES = ("modeling_lrc.py", "lrc_layers.py", "lrc_fast.py")
# a method's remote file imports the core files relatively to its package (``from ...checkpoint.lrc_fast import``):
# in a checkpoint they lie beside it
_CORE_IMPORT = re.compile(r"^(\s*)from \.+checkpoint\.(\w+) import", re.MULTILINE)
ALLOWED_IMPORTS = ("torch", "transformers")  # besides the standard library
TYPES_HEADER = '''"""The module types of this checkpoint: ``lrc.modules[name]["type"]`` -> the builder that
``modeling_lrc.build_module`` calls. Written by lrc when it saved the checkpoint, from its registry of module types
(those the checkpoint uses); each builder comes from the file beside this one that defines its module."""
'''


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
    for name, text in remote_code(lrc["modules"]).items():
        (directory / name).write_text(text)
    normalize_modes(directory)


def remote_code(modules: dict) -> dict[str, str]:
    """The checkpoint's remote code for the specs ``modules``, file name -> text: the core files, the file of each
    module type the specs use (``module_types.used_types``; not of every registered type: a checkpoint carries the
    code it runs, and one a new method adds changes no other checkpoint), and ``lrc_types.py`` importing their
    builders. Each file imports only the standard library, torch, transformers and, relatively, the files beside it
    (checked here)."""
    types = used_types(modules)
    files = {name: (CORE_DIR / name).read_text() for name in CORE_FILES}
    for t in types:
        if t.remote.name not in files:
            files[t.remote.name] = _CORE_IMPORT.sub(r"\1from .\2 import", t.remote.read_text())
    by_file: dict[str, list[str]] = {}
    for t in types:
        by_file.setdefault(t.remote.stem, []).append(t.build.__name__)
    imports = "".join(f"from .{stem} import {', '.join(sorted(set(names)))}\n" for stem, names in by_file.items())
    table = "".join(f'    "{t.name}": {t.build.__name__},\n' for t in types)
    files["lrc_types.py"] = f"{TYPES_HEADER}{imports}\nMODULE_TYPES = {{\n{table}}}\n"
    for name, text in files.items():
        _check_self_contained(name, text, files)
    return files


def _check_self_contained(name: str, text: str, files: dict) -> None:
    """A ``ValueError`` unless ``text`` imports only the standard library, ``ALLOWED_IMPORTS`` and, relatively, the
    other ``files`` (what a checkpoint loaded without lrc has)."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.level:
            ok = node.level == 1 and f"{node.module}.py" in files
            what = "." * node.level + (node.module or "")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            what = ", ".join(mods)
            ok = all(m.split(".")[0] in sys.stdlib_module_names or m.split(".")[0] in ALLOWED_IMPORTS for m in mods)
        else:
            continue
        if not ok:
            raise ValueError(f"lrc checkpoint remote code: {name} imports {what}, which a checkpoint loaded without "
                             f"lrc does not have (files: {', '.join(sorted(files))})")


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
