"""The execution fast path of lrc's modules (imports only torch): weight layouts chosen for the kernels, and one GEMM
for the Linears that receive the very same input tensor. Part of every lrc checkpoint's remote code (the files of the
module types import it relatively). Nothing here changes what is stored: parameters keep their names,
shapes and values, ``state_dict`` gives the same tensors (``save_pretrained`` writes contiguous copies), and outputs
match the plain forward up to float round-off (a GEMM split differently sums in another order).

Measured on a 2-core AMD EPYC with MKL (``scripts/bench_speed.py``, SmolLM2-135M shapes):

- layout: a matrix-vector product ``W x`` with ``W`` (out x in) stored row-major (``nn.Linear``'s layout, dot products
  of length ``in``) is up to 1.6x slower than with ``W`` stored column-major (sums of ``in`` rows of length ``out``)
  when ``out > in``, i.e. for the second factor ``A`` (out x rank) of a low-rank module at batch 1; equal from 128
  tokens on. ``prefer_layout`` stores such a factor column-major: the parameter becomes a transposed view of a
  contiguous ``in x out`` tensor, which ``F.linear`` hands to BLAS without a copy;
- fusion: the first factors of q/k/v (or gate/up) applied as one GEMM save 5-18% of their time from 128 tokens on
  (small GEMMs use the cores badly); in decoding (1-8 tokens a call) the GEMMs gain nothing and the bookkeeping and
  the strided slices cost a few percent, so calls with fewer than ``FUSE_MIN_ROWS`` (64, ``LRC_FUSE_MIN_ROWS``)
  tokens are not fused. ``FusedWeights`` keeps the member weights as row blocks of
  one buffer (the parameters are views of it: no second copy in memory); ``SharedInput`` computes the concatenated
  output once for an input tensor and hands each member its slice.

Fusion runs only without autograd (grad mode off, e.g. ``torch.no_grad()`` as in ``generate``) and not under
``torch.inference_mode()`` (inference tensors carry no version counter, so an in-place write between two members
could not be seen, and a buffer made there could not serve autograd later); otherwise every member computes its own
product. ``LRC_FAST_PATH=0`` in the environment makes modules
built afterwards take the plain forward (``second(first(x))``), ``LRC_FUSE=0`` only turns fusion off;
``modeling_lrc.set_fast_path`` switches a loaded model either way.
"""
from __future__ import annotations

import itertools
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

FAST_PATH = os.environ.get("LRC_FAST_PATH", "1") != "0"
FUSE = FAST_PATH and os.environ.get("LRC_FUSE", "1") != "0"
FUSE_MIN_ROWS = int(os.environ.get("LRC_FUSE_MIN_ROWS", "64"))  # tokens in one call from which fusing pays


def plain(linear: nn.Module) -> bool:
    """True for an ``nn.Linear`` (not a subclass, e.g. a PEFT wrapper) without hooks: its forward is ``F.linear`` with
    its own parameters, so a caller may apply those directly and skip the module call's overhead."""
    return type(linear) is nn.Linear and not (linear._forward_hooks or linear._forward_pre_hooks or
                                              linear._backward_hooks or linear._backward_pre_hooks)


@torch.no_grad()
def prefer_layout(linear: nn.Linear, on: bool = True) -> None:
    """Store ``linear.weight`` column-major (a transposed view of a contiguous ``in x out`` tensor) when ``out > in``
    and ``on``, else row-major again. Same parameter object and values; ``F.linear`` and BLAS take either."""
    w = linear._parameters.get("weight") if isinstance(linear, nn.Linear) else None
    if w is None or w.dim() != 2 or w.device.type == "meta":  # not a Linear's weight (a quantized factor)
        return
    if on and w.shape[0] > w.shape[1] and w.is_contiguous():
        w.data = w.data.t().contiguous().t()
    elif not on and not w.is_contiguous():
        w.data = w.data.contiguous()


class FusedWeights:
    """The weights (and biases) of Linears with the same input size as row blocks of one buffer, so that one GEMM
    applies them all. ``get(linears)`` checks that each parameter is still the view it made (same object, same
    address) and rebuilds the buffer otherwise (a parameter replaced, ``.to()``, a deepcopy); it returns ``(weight,
    bias, bounds)`` (each member's rows), or None when the Linears cannot share one buffer (devices, dtypes or input
    sizes differ)."""

    __slots__ = ("params", "ptrs", "fused")

    def __init__(self):
        self.params, self.ptrs, self.fused = (), (), None

    def get(self, linears) -> tuple | None:
        params = [(m._parameters["weight"], m._parameters["bias"]) for m in linears]
        if len(params) == len(self.params) and all(
                w is w0 and b is b0 and _ptr(w, b) == p for (w, b), (w0, b0), p in zip(params, self.params, self.ptrs)):
            return self.fused
        return self._build(params)

    @torch.no_grad()
    def _build(self, params: list) -> tuple | None:
        first = params[0][0]
        self.params, self.fused = tuple(params), None
        if all(w.dim() == 2 and w.shape[1] == first.shape[1] and w.device == first.device != torch.device("meta") and
               w.dtype == first.dtype and (b is None or (b.device, b.dtype) == (w.device, w.dtype)) for w, b in params):
            sizes = [w.shape[0] for w, _ in params]
            weight = torch.cat([w.detach() for w, _ in params])
            bias = None if all(b is None for _, b in params) else \
                torch.cat([first.new_zeros(n) if b is None else b.detach() for (_, b), n in zip(params, sizes)])
            start = 0
            for (w, b), n in zip(params, sizes):
                w.data = weight[start:start + n]
                if b is not None:
                    b.data = bias[start:start + n]
                start += n
            self.fused = (weight, bias, [(a - n, a) for a, n in zip(itertools.accumulate(sizes), sizes)])
        self.ptrs = tuple(_ptr(w, b) for w, b in params)
        return self.fused


def _ptr(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    return weight.data_ptr(), None if bias is None else bias.data_ptr()


def fusable(x: torch.Tensor) -> bool:
    """Fusion applies: at least ``FUSE_MIN_ROWS`` tokens, no autograd (the buffer is not the parameters for
    autograd), a version-counted input, and no inference mode (a buffer made there could not serve autograd later)."""
    return not (x.numel() < FUSE_MIN_ROWS * x.shape[-1] or torch.is_grad_enabled() or x.is_inference() or
                torch.is_inference_mode_enabled())


class SharedInput:
    """Low-rank modules whose first factors receive the very same input tensor (q/k/v, gate/up, the base of an
    EoRA module and its siblings...), found while the model runs (``first_output``). The first member called with a
    new input computes every member's first factor in one GEMM; the others take their slice while the input is the
    same tensor object at the same version (an in-place write bumps it; a different tensor misses), each once; the
    cached product is dropped when the last member has taken its slice. A miss just recomputes: correctness never
    depends on the call order."""

    __slots__ = ("members", "weights", "entry", "__weakref__")

    def __init__(self, members: list):
        self.members, self.weights, self.entry = [], FusedWeights(), None
        for m in members:
            self.add(m)

    def add(self, module: nn.Module) -> None:
        module._group, module._group_index = self, len(self.members)
        self.members.append(module)
        self.entry = None

    def dissolve(self) -> None:
        for m in self.members:
            m._group = m._group_index = None
        self.members, self.entry = [], None

    def first(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s first-factor output for ``x`` through the fused GEMM, or None (compute it alone)."""
        if not fusable(x):
            return None
        entry = self.entry
        if entry is not None and entry[0]() is x and entry[1] == x._version and index in entry[3]:
            entry[3].discard(index)
            if not entry[3]:
                self.entry = None
            start, stop = entry[4][index]
            return entry[2][..., start:stop]
        fused = self.weights.get([m._modules["first"] for m in self.members])
        if fused is None:
            return None
        weight, bias, bounds = fused
        out = F.linear(x, weight, bias)
        rest = set(range(len(bounds))) - {index}
        self.entry = (weakref.ref(x), x._version, out, rest, bounds) if rest else None
        start, stop = bounds[index]
        return out[..., start:stop]


_LAST: list = [None, None]  # weak references: the last input a low-rank module outside any group saw, that module


def first_output(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)``, the first factor of ``module``, through its ``SharedInput`` group when it has one.
    A module outside any group (with ``module.fuse``) is linked to the previous such module when both received the
    same tensor object: the group forms during the first forward and fuses from the next one on."""
    group = module._group
    if group is not None:
        out = group.first(module._group_index, x)
        if out is not None:
            return out
    elif module.fuse:
        seen, prev = _LAST[0], _LAST[1]
        other = prev() if prev is not None else None
        if other is not None and other is not module and seen() is x and other.fuse:
            if other._group is None:
                SharedInput([other, module])
            else:
                other._group.add(module)
        _LAST[0], _LAST[1] = weakref.ref(x), weakref.ref(module)
    return F.linear(x, weight)
