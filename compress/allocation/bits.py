"""The byte budget's two models (issue 25, part 3): what an option stores at a bit width, and how much error the
quantization adds, for the ``search`` allocator's programs in bytes (``StageConfig.byte_ratio`` with
``quantize.bits_options``).

**Bytes.** A width of 16 stores every value in 2 bytes (bfloat16 / float16: the dense checkpoint a deployer compares
against). A narrower width stores packed codes, per-group scales and zero points exactly as ``quant/math.py``'s
``storage_bytes`` counts them; biases stay at 2 bytes. A Linear at rank r stores its two factors (``r × n`` and
``m × r``), each quantized on its own input columns. A block method's unit (MoDeGPT) is priced from its parameters at
the knob: ``p·bits/8`` plus one scale (and zero point) per ``group_size`` values — its members' shapes at a knob
are the method's, so the group overhead is an estimate there (the written bytes are in the report).

**Error.** LEMS's model (methods.md §12) prices an option by the whitened output error it leaves, relative to the
matrix's: ``t(r) = 1 − E(r)/E`` for a rank-r truncation, and for quantization the measured relative error of
round-to-nearest at that width in the same norm, ``q = ‖(W − Q(W))X‖²/‖WX‖²`` (``linalg.weighted_error``
squared, with the Gram ``H = XXᵀ`` the method already collected). A quantized truncation keeps ``1 − t(r)`` of the
energy with relative error ``q_f`` (the factors' own, measured at one rank, ``FACTOR_PROBE``), and the two errors
are taken as uncorrelated: ``t(r) + (1 − t(r))·q_f``. The allocator scales these like the truncation tail
(``KL_l / t(r0)``). GPTQ (what is finally stored, with ``quantize.method: gptq``) lowers every ``q``; RTN's stands
in for the ranking.

**Compensation.** With ``quantize.compensate`` every quantized matrix (each factor of a pair) carries a residual
path of that rank (EoRA): its bytes are in every option below 16 bits (``Residual.bytes``), so the budget holds for
what is written. Its repair is not credited: the options' errors (and the trials' RTN) are the uncompensated ones,
so the program prices compensation conservatively. MoDeGPT units (members' shapes at a knob are the method's) are
refused under a byte budget with compensation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..linalg import weighted_error
from ..quant.math import QuantSpec, rtn, storage_bytes

DENSE_BITS = 16  # not quantized: 2 bytes a value
FACTOR_PROBE = 0.5  # the factors' quantization error is measured at this fraction of r_eq


def spec_for(quant, bits: int) -> QuantSpec | None:
    """The ``QuantSpec`` of width ``bits`` under the recipe's ``quantize`` section (None for 16: not quantized)."""
    return None if bits == DENSE_BITS else quant.spec(bits)


def matrix_bytes(m: int, n: int, spec: QuantSpec | None) -> int:
    """Bytes of an ``m × n`` weight at ``spec`` (None: 2 bytes a value)."""
    return 2 * m * n if spec is None else storage_bytes(m, n, spec)


@dataclass(frozen=True)
class Residual:
    """``quantize.compensate``'s residual on every quantized matrix: its rank and its factors' spec (None: 2 bytes
    a value)."""
    rank: int
    spec: QuantSpec | None = None

    def bytes(self, m: int, n: int) -> int:
        """Bytes of the residual of an ``m × n`` matrix: rank ``min(rank, m, n)`` (as EoRA fits it), two factors."""
        r = min(self.rank, m, n)
        return matrix_bytes(r, n, self.spec) + matrix_bytes(m, r, self.spec)


def residual_of(quant) -> Residual | None:
    """The residual ``quantize.compensate`` adds to every quantized Linear (None without one)."""
    comp = getattr(quant, "compensate", None)
    return None if comp is None else Residual(comp.rank, spec_for(quant, comp.bits))


def linear_bytes(row, rank: int | None, spec: QuantSpec | None, residual: Residual | None = None) -> int:
    """Bytes of a Linear row kept dense (``rank`` None) or factorised at ``rank``, at ``spec``; biases at 2 bytes.
    ``residual``: ``quantize.compensate``'s path on each quantized matrix (each factor of a pair)."""
    m, n = row.out_features, row.in_features
    bias = 2 * m if row.bias else 0

    def one(a: int, b: int) -> int:
        return matrix_bytes(a, b, spec) + (residual.bytes(a, b) if spec is not None and residual else 0)

    return one(m, n) + bias if rank is None else one(rank, n) + one(m, rank) + bias


def unit_bytes(params: int, spec: QuantSpec | None) -> int:
    """Estimated bytes of a unit of ``params`` values at ``spec``: codes plus a scale (and zero point) per group."""
    if spec is None:
        return 2 * params
    group = spec.group_size or 1024  # one group per row: rows of a few hundred to thousands of values
    per_group = spec.torch_scale_dtype.itemsize + (0 if spec.symmetric else spec.bits / 8)
    return int(params * spec.bits / 8 + -(-params // group) * per_group)


def fake_quant(W: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """``W`` rounded to ``spec`` by RTN and dequantized (same dtype and device); ``W`` itself for None."""
    if spec is None:
        return W
    return rtn(W.double(), spec).dequantize(torch.float64).to(W.device, W.dtype)


@torch.no_grad()
def quant_errors(W: torch.Tensor, H: torch.Tensor | None, factors, specs: dict[int, QuantSpec]) -> torch.Tensor:
    """Rows ``(bits, q_dense, q_factor)`` for each width of ``specs``: RTN's relative weighted error of the dense
    matrix and of the product of its two factors ``factors = (A, B)`` (``W ≈ A B``, each quantized on its own),
    measured against the unquantized product (NaN when ``factors`` is None)."""
    rows = []
    A, B = (f.double() for f in factors) if factors is not None else (None, None)
    for bits, spec in sorted(specs.items()):
        qd = weighted_error(W, fake_quant(W, spec), H) ** 2
        qf = float("nan") if A is None else weighted_error(A @ B, fake_quant(A, spec) @ fake_quant(B, spec), H) ** 2
        rows.append((float(bits), qd, qf))
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)


@dataclass
class Widths:
    """What a byte-budget search reads besides the rank tables: the widths to offer (``quantize.bits_options``),
    the ``quantize`` section (group size, symmetry, scale dtype of every width), each Linear row's
    ``quant_errors`` rows (``qerr``, by row key) and each unit's measured output errors with its Linears at a width
    (``qcurve``: rows ``(knob, bits, error)``, the dense unit at ``knob = dim``)."""

    bits: list[int]
    quant: Any
    qerr: dict[str, torch.Tensor] = field(default_factory=dict)
    qcurve: dict[str, torch.Tensor] = field(default_factory=dict)

    def spec(self, bits: int) -> QuantSpec | None:
        return spec_for(self.quant, bits)

    @property
    def residual(self) -> Residual | None:
        return residual_of(self.quant)

    def errors(self, key: str) -> dict[int, tuple[float, float]]:
        """``{bits: (q_dense, q_factor)}`` of a Linear row."""
        return {int(b): (qd, qf) for b, qd, qf in self.qerr[key].tolist()}

    def unit_errors(self, key: str) -> dict[tuple[int, int], float]:
        """``{(knob, bits): output error}`` of a unit row."""
        return {(int(k), int(b)): e for k, b, e in self.qcurve[key].tolist()}


def searched_bytes(rows, quant) -> tuple[int, int]:
    """Bytes of the rows a byte-budget search chose (each at its ``bits``) and their bytes dense at 16 bits
    (``lrc plan``'s summary; a unit's are the estimate the program used)."""
    used = dense = 0
    for r in rows:
        spec = spec_for(quant, r.bits)
        if r.linear:
            used += linear_bytes(r, r.rank if r.factorize else None, spec, residual_of(quant))
        else:
            used += unit_bytes(r.params_after, spec)
        dense += 2 * r.params_before
    return used, dense
