"""Write a checkpoint's weights as safetensors shards, streaming one tensor at a time.

Sources are read lazily (the tensors outside the decoder blocks from memory, each block from its run-cache file,
opened only while one of its tensors is copied), so writing a checkpoint of any size holds one tensor, not a shard.
The file layout is the safetensors format (8-byte little-endian header length, JSON header padded with spaces to a
multiple of 8, then the raw bytes); the order of the tensors in a file is asked of the safetensors library itself
(it sorts them), so a file is byte-identical to what ``save_file``/``save_pretrained`` write for the same tensors.
One shard is ``model.safetensors``; more are ``model-0000k-of-0000N.safetensors`` with
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), as transformers writes large checkpoints.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..engine.lazy import INDEX_FILE, SINGLE_FILE

MAX_SHARD_BYTES = 5 * 2**30  # transformers' classic default shard size; memory does not depend on it
METADATA = {"format": "pt"}  # what save_pretrained records
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass
class Source:
    """Named tensors to write: their ``(dtype, shape)`` and a function that reads one of them."""

    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    read: Callable[[str], torch.Tensor]

    def nbytes(self) -> int:
        return sum(_nbytes(dt, shape) for dt, shape in self.layout.values())


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def memory_source(tensors: dict[str, torch.Tensor]) -> Source:
    return Source({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, tensors.__getitem__)


def file_source(path: str | Path, prefix: str = "") -> Source:
    """The tensors of one safetensors file, named ``prefix + name``; the file is open only while one is read."""
    with safe_open(str(path), framework="pt") as f:
        layout = {f"{prefix}{k}": (_DTYPES[f.get_slice(k).get_dtype()], tuple(f.get_slice(k).get_shape()))
                  for k in f.keys()}

    def read(name: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name[len(prefix):])
    return Source(layout, read)


def _order(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[list[str], dict[str, str]]:
    """The order safetensors writes these tensors in, and its dtype names (asked with one-element stand-ins)."""
    raw = save({k: torch.zeros(1, dtype=dt) for k, (dt, _) in layout.items()})
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    header.pop("__metadata__", None)
    return list(header), {k: v["dtype"] for k, v in header.items()}


def write_file(path: Path, names: list[str], sources: dict[str, Source]) -> None:
    """One safetensors file of ``names`` (each read from ``sources[name]`` only when its bytes are written)."""
    layout = {k: sources[k].layout[k] for k in names}
    order, dtypes = _order(layout)
    header: dict = {"__metadata__": METADATA}
    offset = 0
    for k in order:
        size = _nbytes(*layout[k])
        header[k] = {"dtype": dtypes[k], "shape": list(layout[k][1]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for k in order:
            t = sources[k].read(k).detach().cpu().contiguous()
            if (t.dtype, tuple(t.shape)) != layout[k]:
                raise ValueError(f"{k}: read {t.dtype} {tuple(t.shape)}, expected {layout[k]}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


def write_shards(directory: str | Path, sources: Iterable[Source], max_shard_bytes: int | None = None) -> list[str]:
    """Write every source's tensors in ``directory``; a source (a block) is never split; return the file names."""
    directory = Path(directory)
    limit = max_shard_bytes or MAX_SHARD_BYTES
    shards: list[list[Source]] = [[]]
    for src in sources:
        if shards[-1] and sum(s.nbytes() for s in shards[-1]) + src.nbytes() > limit:
            shards.append([])
        shards[-1].append(src)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        owner = {k: s for s in shard for k in s.layout}
        tmp = directory / f".{name}.tmp"
        write_file(tmp, list(owner), owner)
        os.replace(tmp, directory / name)
        weight_map.update({k: name for k in owner})
        total += sum(s.nbytes() for s in shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names
