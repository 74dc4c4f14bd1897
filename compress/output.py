"""Crash-safe output directories: everything is written to a temporary directory beside ``--out`` and moved into
place at the end, so a crash at any point leaves either the old checkpoint or the new one whole at ``--out``.

Replacing an existing directory uses Linux's ``renameat2(RENAME_EXCHANGE)``, which swaps the two paths in one atomic
step; where it is unavailable (other systems, some file systems) the old directory is renamed aside first, the new one
moved in, and the old one deleted last — a crash between the two renames leaves both whole, the old one at
``.<name>.old-<pid>`` (named in the error the next run prints).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import LrcError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``; a missing parent directory is created when writing."""
    if out.exists() and not overwrite:
        raise LrcError(f"{out}: output directory exists (use --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise LrcError(f"{out}: exists and is not a directory")
    stale = sorted(out.parent.glob(f".{out.name}.old-*")) if out.parent.is_dir() else []
    if stale and not out.exists():
        raise LrcError(f"{out}: missing, but an earlier replacement was interrupted: the previous checkpoint is "
                       f"whole at {stale[0]} (move it back or delete it)")
    for parent in (out.parent, *out.parent.parents):  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise LrcError(f"{parent}: is not a directory (in --out {out})")
            break


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` sets it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_modes(directory: str | Path) -> None:
    """Give ``directory`` and everything under it the mode a plain write gives under the umask. safetensors writes
    through a temporary file that keeps mode 0600, which would make a shared checkpoint unreadable to others."""
    mask = umask()
    directory = Path(directory)
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to disk (also what other processes wrote to it through a shared memory map)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` and the directories themselves to disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(Path(root))


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (Linux ``renameat2``); False where that is not available."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        fn = ctypes.CDLL(libc_name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    res = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return res == 0


def publish(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` to ``out`` with the modes a plain write gives (``normalize_modes``),
    replacing an existing ``out`` without a window in which neither is whole."""
    normalize_modes(tmp)
    fsync_tree(tmp)
    if out.exists():
        if _exchange(tmp, out):  # now ``out`` is the new checkpoint and ``tmp`` the old one
            fsync_dir(out.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        aside = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, aside)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(aside, out)  # put the old one back
            raise
        fsync_dir(out.parent)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, out)
        fsync_dir(out.parent)


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """``with atomic_dir(out) as tmp:`` write into ``tmp``; on success it becomes ``out``, on any failure (an
    exception, Ctrl-C) it is removed and ``out`` is left as it was. Missing parents of ``out`` are created."""
    out = Path(out)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
