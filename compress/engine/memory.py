"""Give back the memory of replaced weights.

transformers memory-maps safetensors checkpoints, so a weight's pages belong to the file mapping and stay resident
after its module is replaced: without help, peak RSS grows by the size of every new factor. ``release`` drops the
resident pages of a tensor that lies inside a private file mapping of a ``.safetensors`` file (``MADV_DONTNEED``:
the kernel would re-read them from the file if they were touched again; lrc never touches a replaced weight again). Anything
else (anonymous memory, other platforms, GPU tensors) is left to the allocator, which frees it with the tensor.
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

MADV_DONTNEED = 4


def _file_mappings() -> list[tuple[int, int]]:
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith(".safetensors") and parts[1].endswith("p"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                spans.append((lo, hi))
    return spans


def release(tensors: list[torch.Tensor]) -> int:
    """Drop the file-backed resident pages of ``tensors`` (Linux, CPU); returns the bytes advised away."""
    if sys.platform != "linux" or not tensors:
        return 0
    try:
        spans = _file_mappings()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    freed = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in spans):
            continue
        a, b = -(-start // page) * page, end // page * page
        if b > a and libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), MADV_DONTNEED) == 0:
            freed += b - a
    return freed


def trim() -> None:
    """Hand the allocator's free memory back to the system (glibc ``malloc_trim``). Blocks are freed one after
    another with tensors of many sizes; without this the C heap keeps their holes and resident memory creeps up
    with depth although nothing is alive."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
