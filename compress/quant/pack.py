"""Bit packing of unsigned integer codes into bytes along the last dimension (exact, any shape, any length).

Layouts, per row (the last dimension), little-endian in every sense, with zero codes as padding at the end:

* 8 bits: one code per byte, unchanged.
* 4 bits: two codes per byte, the first code in the low nibble (``byte = c0 | c1 << 4``).
* 2 bits: four codes per byte, the first code in the lowest two bits (``byte = c0 | c1 << 2 | c2 << 4 | c3 << 6``).
* 3 bits: eight codes per three bytes: ``v = Σ_k c_k << 3k`` (k = 0..7, a 24-bit integer) stored as its bytes
  ``v & 0xFF, v >> 8 & 0xFF, v >> 16``; a row of ``n`` codes takes ``3 * ceil(n / 8)`` bytes.

``unpack(pack(q, b), b, n)`` returns ``q`` exactly, ``n`` being the original last-dimension length.
"""
from __future__ import annotations

import torch

BITS = (8, 4, 3, 2)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")


def _unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packing unit: 8 → (1, 1), 4 → (2, 1), 2 → (4, 1), 3 → (8, 3)."""
    return (8, 3) if bits == 3 else (8 // bits, 1)


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take along the last dimension once packed."""
    _check_bits(bits)
    codes, nbytes = _unit(bits)
    return -(-int(n) // codes) * nbytes


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``q`` (integers in ``[0, 2**bits − 1]``, shape ``(..., n)``) as uint8 ``(..., packed_length(n))``."""
    _check_bits(bits)
    if q.dim() == 0:
        raise ValueError("pack needs at least one dimension")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    q = q.to(torch.uint8)
    if bits == 8:
        return q.clone()
    codes, nbytes = _unit(bits)
    n = q.shape[-1]
    pad = -n % codes
    if pad:
        q = torch.cat([q, q.new_zeros(*q.shape[:-1], pad)], dim=-1)
    q = q.reshape(*q.shape[:-1], -1, codes).to(torch.int32)
    shifts = torch.arange(codes, dtype=torch.int32, device=q.device) * bits
    word = (q << shifts).sum(dim=-1, dtype=torch.int32)  # (..., units): one integer of codes * bits bits per unit
    if nbytes == 1:
        return word.to(torch.uint8)
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=q.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(*out.shape[:-2], -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` uint8 codes along the last dimension of ``packed``."""
    _check_bits(bits)
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(f"packed last dimension {packed.shape[-1]} does not hold {n} codes of {bits} bits "
                         f"(expected {packed_length(n, bits)} bytes)")
    if bits == 8:
        return packed.to(torch.uint8).clone()
    codes, nbytes = _unit(bits)
    p = packed.to(torch.int32)
    if nbytes > 1:
        p = p.reshape(*p.shape[:-1], -1, nbytes)
        byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=p.device) * 8
        p = (p << byte_shifts).sum(dim=-1, dtype=torch.int32)
    shifts = torch.arange(codes, dtype=torch.int32, device=p.device) * bits
    q = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(*q.shape[:-2], -1)[..., :n].to(torch.uint8)
