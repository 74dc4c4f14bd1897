"""lrc's quantized Linear (``quant``): integer codes packed into bytes, per-group scales (and zero points), and the
forward that runs them — part of the remote code of every checkpoint that holds one (imports only torch).

**Storage** (``QuantLinear``'s buffers, what ``model.safetensors`` holds): ``qweight`` (uint8, out x
``packed_length(in, bits)``: the codes packed along each row, layouts below), ``scales`` (out x groups, float16 by
default) and, unless symmetric, ``qzeros`` (uint8, out x ``packed_length(groups, bits)``); ``bias`` as the model's
dtype. A group is ``group_size`` consecutive input columns of a row (the last may be shorter; ``group_size`` None:
one group per row); ``ŵ = scale·(q − zero)``, symmetric codes have ``zero = 2^(b−1)``.

**Packing**, per row (the last dimension), little-endian in every sense, with zero codes as padding at the end:

* 8 bits: one code per byte, unchanged.
* 4 bits: two codes per byte, the first code in the low nibble (``byte = c0 | c1 << 4``).
* 2 bits: four codes per byte, the first code in the lowest two bits (``byte = c0 | c1 << 2 | c2 << 4 | c3 << 6``).
* 3 bits: eight codes per three bytes: ``v = Σ_k c_k << 3k`` (k = 0..7, a 24-bit integer) stored as its bytes
  ``v & 0xFF, v >> 8 & 0xFF, v >> 16``; a row of ``n`` codes takes ``3 * ceil(n / 8)`` bytes.

``unpack(pack(q, b), b, n)`` returns ``q`` exactly, ``n`` being the original last-dimension length.

**Forward** (``QuantLinear.kernel`` says which path a call takes). PyTorch's own weight-only kernels, the ones
torchao's int4/int8 weight-only layouts call, where they apply: 4 bits with groups of 32/64/128/256 (or one group
a row of at most 256 inputs) on CPU with bfloat16 activations (``torch._weight_int4pack_mm_for_cpu``; the packed
layout is built from ``qweight`` once per device, padded to whole groups and to rows 16 at a time where the shape
needs it: ``QuantLinear._int4_layout``), 8 bits symmetric with one group per row and 16-bit activations
(``torch._weight_int8pack_mm``), for calls of up to ``KERNEL_ROWS`` rows (decode); a longer call there (prefill)
multiplies by a weight dequantized for it and dropped after it (``transient``). Any other case (float32
activations, 3 or 2 bits, another group size, CUDA for now) multiplies by the dequantized weight, computed once and
kept: bytes on disk shrink either way, memory at run time only on the kernel paths.

**Embeddings** (``recipe.quantize.embeddings``): ``QuantEmbedding`` is a ``QuantLinear`` of shape ``num_embeddings x
embedding_dim`` (same buffers; groups along the embedding dimension) whose forward gathers and dequantizes only the
rows it is asked for; ``QuantTiedHead``, the output head of a model that ties it to the embeddings, holds no tensors
and runs ``h Ŵᵀ`` through the embedding's table with the kernels above (the table is stored once).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


INT4_GROUPS = (32, 64, 128, 256)  # group sizes the int4 kernel takes
# Rows a call may have for the weight-only kernels. They read 4 or 8 bits a weight and win where reading the weights
# is the cost (decode: 2-3x a bfloat16 GEMM here at one row, even at 8), and lose where the multiply-adds are (18x
# slower than a bfloat16 GEMM at 512 rows): above this, a call multiplies by a weight dequantized for it and dropped
# after it ("transient": one matrix at a time, so the memory at rest stays the codes).
KERNEL_ROWS = 64


class QuantLinear(nn.Module):
    """``y = x ŵᵀ + b`` with ``ŵ`` stored as ``bits``-bit codes (module docstring). Drop-in for ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = 128,
                 symmetric: bool = False, bias: bool = False, scale_dtype=torch.float16, dtype=None):
        super().__init__()
        _check_bits(bits)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = None if group_size in (None, -1) or group_size >= in_features else int(group_size)
        self.symmetric = symmetric
        groups = self.groups
        self.register_buffer("qweight", torch.zeros(out_features, packed_length(in_features, bits),
                                                    dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=scale_dtype))
        if not symmetric:
            self.register_buffer("qzeros", torch.zeros(out_features, packed_length(groups, bits), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.compute_dtype = dtype or torch.float32  # the model's float type (what a wrapper around it is built in)
        self._cache: dict = {}  # (path, device, dtype) -> what that path runs (not saved)

    @property
    def groups(self) -> int:
        g = self.group_size or self.in_features
        return -(-self.in_features // g)

    @property
    def group_len(self) -> int:
        return self.group_size or self.in_features

    def codes(self) -> torch.Tensor:
        """The uint8 codes (out x in)."""
        return unpack(self.qweight, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """The zero points (out x groups, float32)."""
        if self.symmetric:
            return torch.full((self.out_features, self.groups), float(1 << (self.bits - 1)),
                              device=self.qweight.device)
        return unpack(self.qzeros, self.bits, self.groups).float()

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """``ŵ = scale·(q − zero)`` (out x in), computed in float32."""
        g, n = self.group_len, self.in_features
        s = self.scales.float().repeat_interleave(g, 1)[:, :n]
        z = self.zeros().repeat_interleave(g, 1)[:, :n]
        return (s * (self.codes().float() - z)).to(dtype)

    @property
    def weight_approx(self) -> torch.Tensor:
        """The dense matrix this module applies (materialised; for analysis)."""
        return self.dequantized(self.scales.dtype if self.bias is None else self.bias.dtype)

    def kernel(self, x: torch.Tensor) -> str:
        """The path a forward on ``x`` takes: ``int4_cpu`` or ``int8`` (the weight-only kernels, at most
        ``KERNEL_ROWS`` rows), ``transient`` (where a kernel applies but the call has more rows: a weight
        dequantized for the call, not kept) or ``dequantized`` (any other case: the dequantized weight, kept).
        The int8 kernel takes 16-bit activations only: in float32 it is ~60x slower than a float32 GEMM here."""
        fits = (self.bits == 4 and x.device.type == "cpu" and x.dtype == torch.bfloat16 and self._int4_group()) or \
            (self.bits == 8 and self.symmetric and self.group_size is None and x.dtype in (torch.bfloat16,
                                                                                        torch.float16))
        if not fits:
            return "dequantized"
        if x.numel() > KERNEL_ROWS * self.in_features:
            return "transient"
        return "int4_cpu" if self.bits == 4 else "int8"

    def _prepared(self, path: str, x: torch.Tensor):
        key = (path, x.device, x.dtype)
        if key not in self._cache:
            self._cache.clear()  # one layout at a time: the module's memory stays one copy
            with torch.no_grad():
                if path == "int4_cpu":
                    self._cache[key] = self._int4_layout(x.dtype)
                elif path == "int8":  # the kernel crashes (PyTorch 2.13, CPU) unless the inputs are 16 at a time
                    w8 = (self.codes().to(torch.int16) - 128).to(torch.int8)
                    k_pad = -self.in_features % 16
                    self._cache[key] = (F.pad(w8, (0, k_pad)).contiguous(), self.scales[:, 0].to(x.dtype).contiguous(),
                                        k_pad)
                else:
                    self._cache[key] = (self.dequantized(x.dtype).to(x.device),)
        return self._cache[key]

    def transient_weight(self, dtype) -> torch.Tensor:
        """``dequantized(dtype)`` for one call, faster: the 4-bit codes split by nibble and the groups broadcast
        as a view (the same float32 operations, so the same bits)."""
        n, k, g, groups = self.out_features, self.in_features, self.group_len, self.groups
        p = self.qweight
        codes = p if self.bits == 8 else torch.stack((p & 15, p >> 4), dim=-1).reshape(n, -1)[:, :k] \
            if self.bits == 4 else self.codes()
        if groups * g != k:
            codes = F.pad(codes, (0, groups * g - k))
        w = self.scales.float()[..., None] * (codes.view(n, groups, g).float() - self.zeros()[..., None])
        return w.reshape(n, groups * g)[:, :k].to(dtype)

    def _int4_group(self) -> int | None:
        """The group size the int4 kernel runs this matrix with: its own, or for one group a row (an input size
        below 256, e.g. a factor's rank under the section's group size) the smallest kernel group that holds it."""
        if self.group_len in INT4_GROUPS:
            return self.group_len
        if self.group_size is None:
            return next((g for g in INT4_GROUPS if g >= self.in_features), None)
        return None

    def _int4_layout(self, dtype) -> tuple:
        """The int4 CPU kernel's packed codes and ``(scale, offset)`` table. The kernel takes whole groups and rows
        16 at a time, so a matrix whose input size the group does not divide (SmolLM2's 576 at groups of 128), or
        whose output size is not a multiple of 16 (a factor's rank), is laid out padded: the extra input columns
        meet zero inputs (``forward`` pads ``x``) and the extra output rows are cut off, so the product is the
        stored matrix's."""
        n, k, g = self.out_features, self.in_features, self._int4_group()
        n_pad, k_pad = -n % 16, self.groups * g - k
        codes = F.pad(self.codes().to(torch.int32), (0, k_pad, 0, n_pad), value=8)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        s = self.scales.float()  # kernel: w = (q − 8)·s + z_float
        z = s * (8.0 - self.zeros())
        sz = F.pad(torch.stack([s.t(), z.t()], dim=-1), (0, 0, 0, n_pad)).to(dtype).contiguous()
        return packed, sz, k_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.kernel(x)
        if path == "transient":
            return F.linear(x, self.transient_weight(x.dtype), self.bias)
        prepared = self._prepared(path, x)
        if path == "dequantized":
            return F.linear(x, prepared[0], self.bias)
        flat = x.reshape(-1, self.in_features)
        flat = F.pad(flat, (0, prepared[2])) if prepared[2] else flat.contiguous()  # zeros meet the padded inputs
        if path == "int4_cpu":
            y = torch._weight_int4pack_mm_for_cpu(flat, prepared[0], self._int4_group(), prepared[1])
            y = y[:, :self.out_features] if y.shape[1] != self.out_features else y
        else:
            y = torch._weight_int8pack_mm(flat, prepared[0], prepared[1])
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        """Moved or cast: the scales keep their stored type (``model.to(torch.bfloat16)`` must not round float16
        scales), the bias and ``compute_dtype`` follow the model's; what a path runs is rebuilt on first use."""
        self._cache = {}
        scales = self._buffers["scales"]
        probe = fn(torch.zeros((), dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        out = super()._apply(fn, recurse)
        moved = self._buffers["scales"]
        if moved.dtype != scales.dtype:
            self._buffers["scales"] = scales.to(moved.device)
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def stored_weights(self) -> int:
        """The matrix's weights, held as codes rather than parameters (lrc's parameter counts include them)."""
        return self.in_features * self.out_features

    def storage_bytes(self) -> int:
        """Bytes this module holds on disk: packed codes, scales, zero points and bias."""
        return sum(t.numel() * t.element_size() for t in (*self.buffers(), *self.parameters()))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}")


_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def build_quant(spec: dict, dtype=None, base=None, build=None) -> nn.Module:
    """``quant``: ``in_features``, ``out_features``, ``bits``, ``group_size``, ``symmetric``, ``scale_dtype``,
    ``bias``."""
    return QuantLinear(spec["in_features"], spec["out_features"], spec["bits"], spec.get("group_size"),
                       spec.get("symmetric", False), spec.get("bias", False),
                       _SCALE_DTYPES[spec.get("scale_dtype", "float16")], dtype=dtype)


class QuantEmbedding(QuantLinear):
    """An embedding table ``Ŵ`` (``num_embeddings x embedding_dim``) stored as a ``QuantLinear`` weight of that shape
    (same buffers and layout; groups of ``group_size`` along ``embedding_dim``; no bias). Drop-in for
    ``nn.Embedding``: ``forward(input_ids)`` dequantizes only the gathered rows, in the model's float type. As the
    output head tied to it (``QuantTiedHead``), ``logits(h) = h Ŵᵀ`` takes ``QuantLinear``'s kernels (int8 per row
    symmetric, int4 on CPU, else the dequantized table kept once)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int | None = None,
                 symmetric: bool = True, scale_dtype=torch.float16, dtype=None):
        super().__init__(embedding_dim, num_embeddings, bits, group_size, symmetric, False, scale_dtype, dtype)

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``Ŵ[ids]`` (``ids.shape + (embedding_dim,)``, the model's float type): only these rows unpacked."""
        flat, g, n = ids.reshape(-1), self.group_len, self.in_features
        q = unpack(self.qweight.index_select(0, flat), self.bits, n).float()
        s = self.scales.index_select(0, flat).float().repeat_interleave(g, 1)[:, :n]
        if self.symmetric:
            z = float(1 << (self.bits - 1))
        else:
            z = unpack(self.qzeros.index_select(0, flat), self.bits, self.groups).float().repeat_interleave(g, 1)[:, :n]
        return (s * (q - z)).to(self.compute_dtype).reshape(*ids.shape, n)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rows(input_ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``h Ŵᵀ`` (the tied head): ``QuantLinear``'s forward, with its kernel choice (``kernel(h)``)."""
        return QuantLinear.forward(self, h)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table, dequantized (materialised on each access: for code that reads an embedding's
        ``weight``, e.g. its device or dtype; the forward never does)."""
        return self.dequantized(self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.out_features}, embedding_dim={self.in_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


class QuantTiedHead(nn.Module):
    """The output head tied to a ``QuantEmbedding``: ``logits = h Ŵᵀ`` with the embedding's table, which is stored
    once, in the embedding. Holds no tensors: ``lrc_link`` (called by ``modeling_lrc.link_shared`` once the structure
    is built) finds the embedding by its ``lrc.modules`` name ``embeddings``; it is kept outside the module tree, so
    the table is neither saved, moved nor counted twice."""

    def __init__(self, embeddings: str, in_features: int, out_features: int):
        super().__init__()
        self.embeddings, self.in_features, self.out_features = embeddings, in_features, out_features
        self.__dict__["_table"] = None  # not a submodule (see the class docstring)

    @property
    def table(self) -> QuantEmbedding:
        if self._table is None:
            raise RuntimeError(f"QuantTiedHead: not linked to its embeddings {self.embeddings!r}")
        return self._table

    def lrc_link(self, find) -> None:
        table = find(self.embeddings)
        if not isinstance(table, QuantEmbedding) or (table.embedding_dim, table.num_embeddings) != \
                (self.in_features, self.out_features):
            raise ValueError(f"lrc checkpoint: the tied head's embeddings {self.embeddings!r} are not a quantized "
                             f"{self.out_features} x {self.in_features} table")
        self.__dict__["_table"] = table

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.table.logits(h)

    @property
    def weight_approx(self) -> torch.Tensor:
        """The dense matrix this head applies (the embeddings' table, materialised; for analysis)."""
        return self.table.weight_approx

    def stored_weights(self) -> int:
        """None of its own: the table's weights are the embedding's."""
        return 0

    def storage_bytes(self) -> int:
        return 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to {self.embeddings}"


def build_quant_embedding(spec: dict, dtype=None, base=None, build=None) -> nn.Module:
    """``quant_embedding``: ``num_embeddings``, ``embedding_dim``, ``bits``, ``group_size``, ``symmetric``,
    ``scale_dtype``."""
    return QuantEmbedding(spec["num_embeddings"], spec["embedding_dim"], spec["bits"], spec.get("group_size"),
                          spec.get("symmetric", True), _SCALE_DTYPES[spec.get("scale_dtype", "float16")], dtype=dtype)


def build_quant_tied_head(spec: dict, dtype=None, base=None, build=None) -> nn.Module:
    """``quant_tied_head``: ``embeddings`` (the ``lrc.modules`` name of its ``QuantEmbedding``), ``in_features``,
    ``out_features``."""
    return QuantTiedHead(spec["embeddings"], spec["in_features"], spec["out_features"])
