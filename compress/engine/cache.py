"""On-disk run state: calibration activations between blocks, the captured block kwargs, finished-block marks.

Layout of ``<cache>/runs/<fingerprint>/``: ``acts_<i>.bin`` (raw memmap, samples x seq_len x hidden, model dtype) holds
block i's inputs; ``kwargs.pt`` the non-hidden-state arguments of every block (masks, positions, rotary tables; one
copy per distinct set, ``capture.BlockKwargs.state()``);
``block_<i>.safetensors`` + ``block_<i>.json`` the compressed block and its report rows. The JSON is written last
(fsynced, atomic rename) after the block's weights are flushed to disk (the next block's inputs stay in the page
cache: a killed process loses nothing, a crashed machine is caught by their checksums), so its presence marks block i
finished; it records the size and SHA-256 of those files (the block's weights, the next block's inputs, the kwargs),
and ``--resume`` checks them, so a truncated or corrupted file is reported, never used; ``dense_<i>.bin`` holds the dense model's
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

from ..errors import LrcError
from ..output import fsync_dir, fsync_file


def model_fingerprint(model, items=None) -> str:
    """Identity of a model: its config (without the path it was loaded from) and every byte of every parameter
    and buffer, so a resume or a cached answer never belongs to other weights (hashing is ~1 GB/s). ``items``:
    the ``(name, tensor)`` pairs of ``state_dict`` order from elsewhere (a lazy model's blocks, read one by one)."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in (items if items is not None else model.state_dict().items()):
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def digest(path: Path) -> dict:
    """Size and SHA-256 of a file, as recorded in a finished block's JSON."""
    with open(path, "rb") as f:
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as safetensors atomically (temp file flushed to disk, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path) + ".tmp")
    fsync_file(Path(str(path) + ".tmp"))
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
        if self.existed:
            self.roll_forward()

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
        fsync_file(Path(str(path) + ".tmp"))
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
        """Write block ``i``'s weights and flush them, then mark it finished with a JSON that records the size and
        checksum of every file a resume at block ``i + 1`` reads. A block saved again (a shared group's earlier block,
        now holding its group's fitted module) is staged beside the old files (``block_<i>.next.*``) and committed by the
        rename of its JSON: a crash before it leaves the old block whole, one after it is rolled forward."""
        st = self.dir / f"block_{i}.safetensors"
        again = self.block_done(i)
        target = self.dir / f"block_{i}.next.safetensors" if again else st
        save_tensors(target, tensors)  # flushed to disk: the result
        acts = sorted(self.dir.glob(f"*_{i + 1}.bin"))
        needed = [*acts, *sorted(self.dir.glob("kwargs*.pt"))]
        # the next block's inputs are not forced to disk: a crashed process leaves them whole in the page cache; a
        # crashed machine may not, and then their recorded checksum tells ``--resume`` (the run starts over)
        info = {**info, "files": {st.name: digest(target), **{p.name: digest(p) for p in needed}}}
        name = f"block_{i}.next.json" if again else f"block_{i}.json"
        tmp = self.dir / f"{name}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(info))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)
        fsync_dir(self.dir)
        if again:
            self.roll_forward()

    def roll_forward(self) -> None:
        """Finish the second saves committed (``block_<i>.next.json`` written) but not yet moved into place; drop
        the staged weights of one never committed."""
        for nj in sorted(self.dir.glob("block_*.next.json")):
            i = nj.name.split("_", 1)[1].split(".", 1)[0]
            staged = self.dir / f"block_{i}.next.safetensors"
            if staged.is_file():
                os.replace(staged, self.dir / f"block_{i}.safetensors")
            os.replace(nj, self.dir / f"block_{i}.json")
        for staged in self.dir.glob("block_*.next.safetensors"):
            staged.unlink()
        fsync_dir(self.dir)

    def _info(self, i: int) -> dict:
        path = self.dir / f"block_{i}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise self._corrupt(path, f"unreadable ({err})") from None

    def _corrupt(self, path: Path, what: str) -> LrcError:
        return LrcError(f"{path}: {what}; the run cache cannot be resumed (rerun without --resume to start over)")

    def verify(self, done: int) -> None:
        """Before resuming at block ``done``: every finished block's weights, and the inputs and kwargs of block
        ``done``, must be the files their block JSON recorded (size, then SHA-256); else one-line ``LrcError``."""
        for i in range(done):
            files = self._info(i).get("files")
            if files is None:
                raise self._corrupt(self.dir / f"block_{i}.json", "records no file checksums")
            for name, rec in files.items():
                if i < done - 1 and not name.startswith("block_"):
                    continue  # inputs of blocks already finished are gone by design
                path = self.dir / name
                if not path.is_file():
                    raise self._corrupt(path, "missing")
                if path.stat().st_size != rec["bytes"]:
                    raise self._corrupt(path, f"truncated or overwritten ({path.stat().st_size} bytes, "
                                              f"recorded {rec['bytes']})")
                if digest(path)["sha256"] != rec["sha256"]:
                    raise self._corrupt(path, "corrupted (SHA-256 differs from the one recorded when it was written)")

    def block_info(self, i: int) -> dict:
        """Block ``i``'s record (module specs, report rows, file checksums), without reading its weights."""
        return self._info(i)

    def load_block(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        info = self._info(i)
        return load_file(str(self.dir / f"block_{i}.safetensors")), info

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
