"""On-disk run state: calibration activations between blocks, the captured block kwargs, finished-block marks.

Layout of ``<cache>/runs/<fingerprint>/``: ``acts_<i>.bin`` (raw memmap, samples x seq_len x hidden, model dtype) holds
block i's inputs; ``kwargs.pt`` the non-hidden-state arguments the blocks need (masks, positions, rotary tables);
``block_<i>.safetensors`` + ``block_<i>.json`` the compressed block and its report rows. The JSON is written last
(atomic rename), so its presence marks block i finished; ``dense_<i>.bin`` holds the dense model's
activations when ``engine.objective`` is ``dense``, and ``stage<k>_<i>.bin`` + ``kwargs_stage<k>.pt`` the stream of a
stage with its own calibration set (engine/streams.py); ``--resume`` restarts at the first unfinished block.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def model_fingerprint(model) -> str:
    """Cheap identity of a model: config plus a strided sample of every parameter's values."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as safetensors atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def load_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    return load_file(str(path)) if path.is_file() else None


class RunCache:
    def __init__(self, root: Path, fingerprint: str, resume: bool):
        self.dir = Path(root) / "runs" / fingerprint[:24]
        self.existed = resume and self.dir.exists()  # an interrupted run's cache, kept for --resume
        if not resume and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    # activations ---------------------------------------------------------------------------------------------
    def acts_path(self, i: int, stream: str = "acts") -> Path:
        return self.dir / f"{stream}_{i}.bin"

    def acts(self, i: int, shape: tuple[int, ...], dtype: torch.dtype, create: bool = False,
             stream: str = "acts") -> torch.Tensor:
        """A tensor memory-mapped on ``<stream>_<i>.bin``; writes to it land in the file. Streams: ``acts`` (the
        compressed model's activations) and ``dense`` (the dense model's, kept for ``objective: dense``)."""
        path = self.acts_path(i, stream)
        numel = int(torch.Size(shape).numel())
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if create:
            tmp = path.with_suffix(".partial")
            with open(tmp, "wb") as f:
                f.truncate(nbytes)
            os.replace(tmp, path)
        elif not path.is_file() or path.stat().st_size != nbytes:
            raise FileNotFoundError(path)
        return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)

    def drop_acts(self, i: int) -> None:
        """Remove block ``i``'s inputs of every stream (calibration streams, ``dense``, ``spectra``)."""
        for path in self.dir.glob(f"*_{i}.bin"):
            path.unlink(missing_ok=True)

    # whole-run statistics (Fisher sums, allocation spectra) -------------------------------------------------------
    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_tensors(self.dir / f"{name}.safetensors", tensors)

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        return load_tensors(self.dir / f"{name}.safetensors")

    # block kwargs ---------------------------------------------------------------------------------------------
    def _kwargs_path(self, stream: str) -> Path:
        return self.dir / ("kwargs.pt" if stream == "acts" else f"kwargs_{stream}.pt")

    def save_kwargs(self, kwargs: dict, stream: str = "acts") -> None:
        path = self._kwargs_path(stream)
        torch.save(kwargs, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)

    def load_kwargs(self, stream: str = "acts") -> dict | None:
        path = self._kwargs_path(stream)
        return torch.load(path, weights_only=True) if path.is_file() else None

    # finished blocks ------------------------------------------------------------------------------------------
    def block_done(self, i: int) -> bool:
        return (self.dir / f"block_{i}.json").is_file()

    def first_unfinished(self, n: int) -> int:
        i = 0
        while i < n and self.block_done(i):
            i += 1
        return i

    def save_block(self, i: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
        st = self.dir / f"block_{i}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(st) + ".tmp")
        os.replace(str(st) + ".tmp", st)
        tmp = self.dir / f"block_{i}.json.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.dir / f"block_{i}.json")

    def load_block(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        info = json.loads((self.dir / f"block_{i}.json").read_text())
        return load_file(str(self.dir / f"block_{i}.safetensors")), info

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
