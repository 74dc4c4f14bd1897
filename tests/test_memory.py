"""Replaced weights give their memory back when they live in a private mapping of a ``.safetensors`` file (how
transformers loads checkpoints: safetensors maps the file copy-on-write).

The proof is observable, not a counter: a weight modified in memory sits in copy-on-write pages; once ``release``
has advised those pages away, reading the weight again shows the FILE's bytes (the kernel re-reads them), while a
neighbouring weight in the same mapping keeps its modification and anonymous memory is never touched. The file is
written here, so nothing depends on whether a given transformers version maps its checkpoints."""
import json
import os
import struct
import sys

import pytest
import torch
from safetensors.torch import safe_open, save_file

from compress.engine.memory import release

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _from_file(path):
    """``a``, ``b`` as views of one private (copy-on-write) mapping made by torch itself."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=len(raw))
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    out = {}
    for name in ("a", "b"):
        lo, hi = header[name]["data_offsets"]
        out[name] = flat[8 + n + lo : 8 + n + hi].view(torch.float32)
    return out["a"], out["b"]


def _safe_open(path):
    """``a``, ``b`` as safetensors returns them (the loader transformers uses)."""
    f = safe_open(str(path), framework="pt")
    return f.get_tensor("a"), f.get_tensor("b")


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_DONTNEED on file mappings is Linux-only")
@pytest.mark.parametrize("mapper", [_from_file, _safe_open], ids=["torch.from_file", "safetensors.safe_open"])
def test_release_drops_the_pages_of_file_backed_weights_only(mapper, tmp_path):
    numel = 16 * PAGE // 4  # 16 pages of float32 each
    ref_a, ref_b = torch.arange(numel, dtype=torch.float32) + 1, -torch.arange(numel, dtype=torch.float32) - 1
    path = tmp_path / "weights.safetensors"
    save_file({"a": ref_a, "b": ref_b}, str(path))
    a, b = mapper(path)
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b)
    a.zero_()  # now private copy-on-write pages, different from the file
    b.zero_()
    start = a.data_ptr()
    lo, hi = -(-start // PAGE) * PAGE, (start + numel * 4) // PAGE * PAGE  # whole pages inside a
    i, j = (lo - start) // 4, (hi - start) // 4

    freed = release([a])

    assert freed == hi - lo >= 15 * PAGE  # every whole page of a, nothing beyond it
    assert torch.equal(a[i:j], ref_a[i:j])  # the pages were dropped: the file's bytes are back
    assert not a[:i].any() and not a[j:].any()  # partial pages at the edges are left alone
    assert not b.any()  # the neighbour in the same mapping keeps its (modified) pages
    anon = torch.randn(4 * PAGE)
    before = anon.clone()
    assert release([anon]) == 0 and torch.equal(anon, before)  # anonymous memory is never advised away
