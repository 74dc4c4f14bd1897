"""Weight quantization math: group parameters, round-to-nearest, GPTQ, and the exact byte count of the result.

Notation follows ../shared/methods.md: a Linear has weight ``W`` (m x n, ``y = W x``), calibration inputs ``X``
(n x N) and input Gram ``H = X Xᵀ`` (n x n). Conventions (methods.md §15; issue 25):

* **Groups.** Per output row, groups of ``group_size`` consecutive input columns: column ``j`` belongs to group
  ``j // group_size``; a row length not divisible by ``group_size`` gets a shorter last group; ``group_size`` None
  (or -1) means one group per row. ``scale`` and ``zero`` have shape ``(m, ceil(n / group_size))``.
* **Asymmetric** (default). ``b`` bits, ``maxq = 2^b − 1``. The range is widened to contain 0, as in the reference
  GPTQ code: ``lo = min(min w, 0)``, ``hi = max(max w, 0)``, ``scale = (hi − lo) / maxq``,
  ``zero = round(−lo / scale)`` clamped to ``[0, maxq]`` (an integer, so 0 is exactly representable).
* **Symmetric.** ``scale = 2 max|w| / maxq`` and a fixed ``zero = 2^(b−1)``: the signed codes
  ``q − 2^(b−1) ∈ [−2^(b−1), 2^(b−1) − 1]`` are stored offset by ``2^(b−1)`` as unsigned codes (the GPTQ reference
  and torchao's symmetric affine mapping use the same scale). No zeros are stored.
* **Codes.** ``q = clamp(round(w / scale) + zero, 0, maxq)`` (uint8, round half to even), ``ŵ = scale (q − zero)``.
  Inside the range every element is within ``scale / 2`` of its reconstruction.
* **Scales** are rounded to ``spec.scale_dtype`` (float16 by default) as soon as they are chosen, and the zero
  point is computed from the rounded scale, so the values the quantizers optimise are the values that are stored.
  A group whose scale would be 0 (all zeros) or smaller than that dtype's smallest normal number gets the smallest
  normal number instead (scale > 0 always). ``QuantizedWeight.scale`` holds them as float32 (exact).
* **Storage** (``storage_bytes``, ``QuantizedWeight.to_packed``): the codes packed row by row
  (:mod:`compress.quant.pack`), the scales in ``scale_dtype``, and for asymmetric specs the integer zero points
  packed row by row with the same bit width as the codes (``m x packed_length(groups, b)`` bytes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .pack import BITS, pack, packed_length, unpack

SCALE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                        "float32": torch.float32}


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized: ``bits`` (8, 4, 3 or 2), ``group_size`` consecutive input columns per scale
    (default 128; None or -1: one group per row), ``symmetric`` (default False: integer zero point per group) and
    ``scale_dtype`` (the dtype scales are stored in: float16, bfloat16 or float32). See the module docstring."""

    bits: int
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: str = "float16"

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        if self.group_size == -1:
            object.__setattr__(self, "group_size", None)
        elif self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                              or self.group_size < 1):
            raise ValueError(f"group_size must be a positive integer, or -1 / None for one group per row; "
                             f"got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")

    @property
    def maxq(self) -> int:
        """The largest code, ``2^bits − 1``."""
        return (1 << self.bits) - 1

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def group_len(self, in_features: int) -> int:
        """Columns per group for a row of ``in_features`` (the last group may be shorter)."""
        return in_features if self.group_size is None else min(self.group_size, in_features)

    def n_groups(self, in_features: int) -> int:
        """Groups per row: ``ceil(in_features / group_size)``."""
        return -(-in_features // max(self.group_len(in_features), 1))


@dataclass
class QuantizedWeight:
    """A quantized m x n weight: ``codes`` (uint8, m x n), ``scale`` (float32, m x groups, values representable in
    ``spec.scale_dtype``), ``zero`` (uint8, m x groups; ``2^(b−1)`` everywhere when symmetric) and its ``spec``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``ŵ = scale (q − zero)`` per group, as ``dtype``."""
        return dequantize(self.codes, self.scale, self.zero, self.spec, dtype)

    def storage_bytes(self, scale_bytes: int | None = None) -> int:
        return storage_bytes(*self.shape, self.spec, scale_bytes)

    def to_packed(self) -> dict[str, torch.Tensor]:
        """The stored tensors: ``qweight`` (uint8, m x packed_length(n)), ``scales`` (``scale_dtype``, m x groups)
        and, when asymmetric, ``qzeros`` (uint8, m x packed_length(groups)). Their bytes sum to ``storage_bytes``."""
        out = {"qweight": pack(self.codes, self.spec.bits),
               "scales": self.scale.to(self.spec.torch_scale_dtype)}
        if not self.spec.symmetric:
            out["qzeros"] = pack(self.zero, self.spec.bits)
        return out

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]
                    ) -> "QuantizedWeight":
        """Inverse of :meth:`to_packed` for an m x n weight (exact)."""
        m, n = shape
        codes = unpack(tensors["qweight"], spec.bits, n)
        scale = tensors["scales"].to(torch.float32)
        if spec.symmetric:
            zero = torch.full((m, spec.n_groups(n)), 1 << (spec.bits - 1), dtype=torch.uint8, device=codes.device)
        else:
            zero = unpack(tensors["qzeros"], spec.bits, spec.n_groups(n))
        return cls(codes=codes, scale=scale, zero=zero, spec=spec)


def storage_bytes(out_features: int, in_features: int, spec: QuantSpec, scale_bytes: int | None = None) -> int:
    """Exact bytes of a quantized ``out_features x in_features`` weight as :meth:`QuantizedWeight.to_packed` stores
    it: packed codes + scales (``scale_bytes`` each, by default the size of ``spec.scale_dtype``: 2 for float16)
    + packed zero points when asymmetric."""
    groups = spec.n_groups(in_features)
    if scale_bytes is None:
        scale_bytes = spec.torch_scale_dtype.itemsize
    total = out_features * packed_length(in_features, spec.bits) + out_features * groups * scale_bytes
    if not spec.symmetric:
        total += out_features * packed_length(groups, spec.bits)
    return total


def _check_weight(W: torch.Tensor) -> torch.Tensor:
    if W.dim() != 2 or W.shape[1] == 0:
        raise ValueError(f"expected a 2-D weight with at least one column, got shape {tuple(W.shape)}")
    W = W.detach().to(torch.float64)
    if not torch.isfinite(W).all():
        raise ValueError("weight has non-finite entries")
    return W


def _storable_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``scale`` rounded to ``spec.scale_dtype`` (float64 result), at least that dtype's smallest normal number."""
    dtype = spec.torch_scale_dtype
    out = scale.clamp_min(torch.finfo(dtype).tiny).to(dtype).to(torch.float64)
    if not torch.isfinite(out).all():
        raise ValueError(f"a scale overflows {spec.scale_dtype}: store scales as float32")
    return out


def _params(Wg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest ``(scale, zero)`` (float64) over the last dimension of ``Wg`` (one group per leading index).

    Zero-padding a group does not change its parameters (its range always contains 0)."""
    if spec.symmetric:
        scale = _storable_scale(2.0 * Wg.abs().amax(dim=-1) / spec.maxq, spec)
        return scale, torch.full_like(scale, float(1 << (spec.bits - 1)))
    lo = Wg.amin(dim=-1).clamp_max(0.0)
    hi = Wg.amax(dim=-1).clamp_min(0.0)
    scale = _storable_scale((hi - lo) / spec.maxq, spec)
    return scale, torch.round(-lo / scale).clamp(0, spec.maxq)


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes (float64) ``clamp(round(w / scale) + zero, 0, maxq)``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _per_column(t: torch.Tensor, spec: QuantSpec, n: int) -> torch.Tensor:
    """Expand an (m, groups) tensor to (m, n): column ``j`` takes group ``j // group_len``."""
    return t.repeat_interleave(spec.group_len(n), dim=1)[:, :n]


def quant_params(W: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest ``(scale, zero)`` per (row, group) of ``W`` (m x n): float32 scales (values representable in
    ``spec.scale_dtype``), uint8 zero points, both (m, groups). Conventions in the module docstring."""
    W = _check_weight(W)
    m, n = W.shape
    g, groups = spec.group_len(n), spec.n_groups(n)
    padded = torch.nn.functional.pad(W, (0, groups * g - n)).reshape(m, groups, g)
    scale, zero = _params(padded, spec)
    return scale.to(torch.float32), zero.to(torch.uint8)


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """uint8 codes ``clamp(round(w / scale) + zero, 0, 2^b − 1)`` of ``W`` (m x n), per-group ``scale``, ``zero``."""
    W = _check_weight(W)
    n = W.shape[1]
    s = _per_column(scale.to(torch.float64), spec, n)
    z = _per_column(zero.to(torch.float64), spec, n)
    return _round(W, s, z, spec.maxq).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``ŵ = scale (q − zero)`` per group (computed in float64, returned as ``dtype``)."""
    n = q.shape[1]
    s = _per_column(scale.to(torch.float64), spec, n)
    z = _per_column(zero.to(torch.float64), spec, n)
    return (s * (q.to(torch.float64) - z)).to(dtype)


def rtn(W: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of ``W`` (m x n) with per-group parameters from :func:`quant_params`."""
    scale, zero = quant_params(W, spec)
    return QuantizedWeight(codes=quantize(W, scale, zero, spec), scale=scale, zero=zero, spec=spec)


def _upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """Upper ``U`` with ``Uᵀ U = H⁻¹`` (GPTQ Alg. 1 line 2, "Cholesky(H⁻¹)ᵀ"), float64."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError("the damped Gram is not positive definite: raise damp")
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise ValueError("the inverse Gram is not positive definite: raise damp")
    return U


def gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False) -> QuantizedWeight:
    """GPTQ (Frantar et al., ICLR 2023, arXiv 2210.17323, Alg. 1): quantize ``W`` (m x n) column by column and
    push each column's error onto the columns not yet quantized, minimising ``||(W − Ŵ) X||_F`` given ``H = X Xᵀ``.

    In float64: dead inputs (``H_jj = 0``) get ``H_jj = 1`` and their weights set to 0; ``H += damp · mean(diag H) ·
    I``; ``U`` = upper Cholesky factor of ``H⁻¹``. For column ``j``: ``q_j`` = RTN of ``w_j`` with its group's
    parameters, ``e_j = (w_j − ŵ_j) / U_jj``, ``W[:, k] −= e_j U_jk`` for ``k > j`` (Eq. 3 with the Cholesky
    rows, Alg. 1). Updates are applied lazily: exactly within a block of ``block_size`` columns, and to the columns
    after the block in one matrix product when the block ends (Sec. 3 "Lazy Batch-Updates"); the result is the same
    as applying every update at once.

    Group parameters. Without ``act_order`` a group's ``(scale, zero)`` are chosen when its first column is reached,
    from the group's current, error-updated weights (the reference code with ``static_groups=False``; columns of
    the group beyond the current block include the block's pending updates). With ``act_order`` columns are
    processed in order of descending ``diag H`` (stable), and all group parameters are computed up front from the
    original weights, in the original column order ("static groups"): stored groups are always consecutive
    original columns, so storage and :func:`dequantize` are the same with or without ``act_order`` (no group index).
    Codes are returned in the original column order.
    """
    W = _check_weight(W).clone()
    m, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"Gram shape {tuple(H.shape)} does not match {n} input features")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    H = H.detach().to(device=W.device, dtype=torch.float64).clone()
    if not torch.isfinite(H).all():
        raise ValueError("Gram has non-finite entries")
    dead = torch.nonzero(H.diagonal() == 0).squeeze(1)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    g, groups, maxq = spec.group_len(n), spec.n_groups(n), spec.maxq
    scale = torch.zeros(m, groups, dtype=torch.float64, device=W.device)
    zero = torch.zeros_like(scale)
    perm = None
    if act_order:
        static_scale, static_zero = quant_params(W, spec)
        scale, zero = static_scale.to(torch.float64), static_zero.to(torch.float64)
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype, device=H.device)
    U = _upper_cholesky_of_inverse(H)

    Q = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            grp = int(perm[j]) // g if perm is not None else j // g
            if perm is None and j % g == 0:
                scale[:, grp], zero[:, grp] = _params(_current(W, W1, E1, U, i1, i2, j, min(j + g, n)), spec)
            s, z = scale[:, grp], zero[:, grp]
            w = W1[:, i]
            q = _round(w, s, z, maxq)
            Q[:, j] = q
            err = (w - s * (q - z)) / U[j, j]
            W1[:, i:] -= err[:, None] * U[j, j:i2][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return QuantizedWeight(codes=Q.to(torch.uint8), scale=scale.to(torch.float32), zero=zero.to(torch.uint8),
                           spec=spec)


def _current(W: torch.Tensor, W1: torch.Tensor, E1: torch.Tensor, U: torch.Tensor, i1: int, i2: int, start: int,
             stop: int) -> torch.Tensor:
    """Columns ``start:stop`` of the weight with every update so far applied: inside the block from ``W1``, after it
    from ``W`` minus the block's pending updates (``E1`` holds zeros for the columns not yet quantized)."""
    inside = W1[:, start - i1:min(stop, i2) - i1]
    if stop <= i2:
        return inside
    after = W[:, i2:stop] - E1 @ U[i1:i2, i2:stop]
    return torch.cat([inside, after], dim=1)
