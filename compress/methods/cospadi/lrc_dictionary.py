"""CoSpaDi's module type ``dictionary`` (imports only torch): ``DictLinear``, a dense dictionary and sparse
coefficients, possibly sharing another layer's dictionary. Written into the remote code of every checkpoint that has
one (``checkpoint/save.py``)."""
from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import nn


class DictLinear(nn.Module):
    """``y = C (D^T x) + bias``: CoSpaDi (Makhov et al., arXiv 2509.22075). ``W`` (out x in) is approximated by
    ``W~ = C D^T``: ``dictionary`` applies ``D^T`` (``atoms`` x in, dense), then each output row ``j`` is a sparse
    combination of exactly ``nnz`` atoms: ``C[j]`` has ``nnz`` structural non-zeros (column-wise sparse coding).

    Stored as in the paper's Eq. 10: ``values`` (out x nnz, each row's coefficients in ascending atom order) and
    ``mask``, the support as a packed bitmask (out x ceil(atoms / 8) bytes; atom ``a`` of row ``j`` is bit ``a % 8``
    of ``mask[j, a // 8]``); no dense ``C`` is stored.

    With ``shared_from`` (the full name of another ``DictLinear``, the owner) the module has no dictionary of its
    own: it uses the owner's (one dictionary for the same projection of several consecutive layers, CoSpaDi §3.3).
    ``link(owner)`` attaches it; the owner is held in a plain list, not as a submodule, so ``state_dict``,
    ``parameters``, ``.to()`` and ``deepcopy`` of the sharer leave it out (see ``__deepcopy__``).

    Execution (CoSpaDi §3.4): nominally ``N n k + N s m`` multiply-adds for ``N`` tokens, but ``C`` is 50% dense at
    ``k / s = 2``, where sparse kernels gain little (the paper measured its sparse forward slower than SVD-LLM's).
    So the forward runs dense kernels on a plan built once and cached (plain attributes, never saved): the factored
    path ``C (D^T x)`` with ``C`` densified when ``k (n + m) < m n`` flops per token, else one ``W~ x`` with
    ``W~ = C D^T``. The plan is rebuilt when ``values``, ``mask`` or the dictionary weight change (in-place updates
    bump their version counters; new tensors, device or dtype are seen too; ``.data`` writes are not: call
    ``reset_plan()``). While training or with gradients wanted (grad enabled and the module training or any of its
    tensors requiring grad), ``C`` is scattered from ``values`` each call, so gradients reach ``values`` and the
    dictionary.
    """

    def __init__(self, in_features: int, out_features: int, atoms: int, nnz: int, bias: bool = False,
                 shared_from: str | None = None, device=None, dtype=None):
        super().__init__()
        if not 0 < nnz <= atoms:
            raise ValueError(f"DictLinear: nnz {nnz} must be in 1..atoms ({atoms})")
        self.in_features, self.out_features, self.atoms, self.nnz = in_features, out_features, atoms, nnz
        self.shared_from, self._owner = shared_from, None
        if shared_from is None:
            self.dictionary = nn.Linear(in_features, atoms, bias=False, device=device, dtype=dtype)
        self.values = nn.Parameter(torch.empty(out_features, nnz, device=device, dtype=dtype))
        self.register_buffer("mask", torch.zeros(out_features, (atoms + 7) // 8, device=device, dtype=torch.uint8))
        bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_parameter("bias", bias)
        self._plan = self._index = None

    @classmethod
    def from_sparse(cls, dictionary: torch.Tensor | DictLinear | None, index: torch.Tensor, values: torch.Tensor,
                    bias: torch.Tensor | None = None, shared_from: str | None = None, dtype=None, *,
                    in_features: int | None = None, atoms: int | None = None) -> DictLinear:
        """The module with coefficients ``values`` (out x nnz) at atoms ``index`` (out x nnz, distinct per row, any
        order: each row is sorted by atom). ``dictionary`` is the ``atoms x in`` tensor (the module owns it), or, with
        ``shared_from`` naming the owner, the owner ``DictLinear`` (linked) or None (unlinked; then ``in_features``
        and ``atoms`` give the shape). ``dtype`` defaults to that of ``values``."""
        shared = isinstance(dictionary, DictLinear) or dictionary is None
        if shared != (shared_from is not None):
            raise ValueError("DictLinear.from_sparse: give a dictionary tensor, or shared_from and the owner (or None)")
        if isinstance(dictionary, DictLinear):
            in_features, atoms = dictionary.in_features, dictionary.atoms
        elif dictionary is not None:
            atoms, in_features = dictionary.shape
        if in_features is None or atoms is None:
            raise ValueError(f"DictLinear.from_sparse: an unlinked sharer of {shared_from!r} needs in_features, atoms")
        index = torch.as_tensor(index, device=values.device).long()
        _check_support(index, values, atoms)
        index, order = index.sort(dim=1)
        module = cls(in_features, index.shape[0], atoms, index.shape[1], bias is not None, shared_from,
                     device=values.device, dtype=dtype or values.dtype)
        with torch.no_grad():
            module.values.copy_(values.gather(1, order))
            module.mask.copy_(_pack_support(index, atoms))
            if bias is not None:
                module.bias.copy_(bias)
            if shared_from is None:
                module.dictionary.weight.copy_(dictionary)
        if isinstance(dictionary, DictLinear):
            module.link(dictionary)
        return module

    def lrc_link(self, find) -> None:
        """``modeling_lrc.apply_structure``, once every module is built: a sharer links to the module ``find`` gives
        for ``shared_from`` (or to the module a wrapper keeps there as its ``base``, e.g. an EoRA residual's)."""
        if self.shared_from is None:
            return
        owner = find(self.shared_from)
        while not isinstance(owner, DictLinear) and isinstance(getattr(owner, "base", None), nn.Module):
            owner = owner.base
        if not isinstance(owner, DictLinear):
            raise ValueError(f"lrc checkpoint: {self.shared_from!r} is no dictionary module of this model (shared "
                             "dictionaries link a DictLinear to the DictLinear that owns the dictionary)")
        self.link(owner)

    def link(self, owner: DictLinear) -> None:
        """Use ``owner``'s dictionary (this module's ``shared_from``). Kept in a plain list: not a submodule."""
        if not isinstance(owner, DictLinear) or owner.shared_from is not None or self.shared_from is None or \
                (owner.in_features, owner.atoms) != (self.in_features, self.atoms):
            raise ValueError(f"DictLinear: cannot link a sharer of {self.shared_from!r} ({self.atoms} atoms x "
                             f"{self.in_features}) to {type(owner).__name__} {getattr(owner, 'shared_from', '')!r} "
                             f"(it must own an {self.atoms} x {self.in_features} dictionary)")
        self._owner = [owner]

    @property
    def dict_weight(self) -> torch.Tensor:
        """The ``atoms x in_features`` dictionary ``D^T`` (this module's or its owner's)."""
        owner = self if self.shared_from is None else self._owner[0] if self._owner is not None else None
        if owner is None:
            raise RuntimeError(f"DictLinear shares the dictionary of {self.shared_from!r} but is not linked to it "
                               "(call link(owner); lrc checkpoints: modeling_lrc.apply_structure)")
        return owner._modules["dictionary"]._parameters["weight"]

    @property
    def exec_path(self) -> str:
        """``"factored"`` (``C (D^T x)``) when ``k (n + m) < m n`` multiply-adds per token, else ``"dense"``
        (``W~ x``): the path the forward takes, cached or not."""
        factored = self.atoms * (self.in_features + self.out_features) < self.out_features * self.in_features
        return "factored" if factored else "dense"

    def support(self) -> torch.Tensor:
        """The atoms of each output row (out x nnz, long, ascending), unpacked from ``mask``."""
        return self._support().clone()

    def coefficients(self) -> torch.Tensor:
        """The dense ``C`` (out x atoms) in the dtype of ``values`` (differentiable in ``values``)."""
        zeros = self.values.new_zeros(self.out_features, self.atoms)
        return zeros.scatter(1, self._support(), self.values)

    @property
    def weight_approx(self) -> torch.Tensor:
        """The dense matrix ``C D^T`` this module applies (materialised; for analysis, not for the forward)."""
        return self.coefficients() @ self.dict_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias, dictionary = self._parameters["bias"], self.dict_weight
        if self._wants_grad():
            coeff = self.coefficients()
            if self.exec_path == "factored":
                return F.linear(F.linear(x, dictionary), coeff, bias)
            return F.linear(x, coeff @ dictionary, bias)
        path, weight = self._current_plan(dictionary)
        return F.linear(F.linear(x, dictionary), weight, bias) if path == "factored" else F.linear(x, weight, bias)

    def storage_bytes(self) -> int:
        """Bytes this module writes to a checkpoint: values, mask, bias and the dictionary if it owns it."""
        tensors = [self.values, self.mask, self.bias, None if self.shared_from else self.dictionary.weight]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def reset_plan(self) -> None:
        """Drop the cached plan and support (after writing the tensors through ``.data``)."""
        self._plan = self._index = None

    def _wants_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.training or any(
            t is not None and t.requires_grad for t in (self._parameters["values"], self._parameters["bias"],
                                                        self.dict_weight)))

    def _support(self) -> torch.Tensor:
        """``support()``, cached until ``mask`` changes."""
        if self._index is None or not _fresh(self._index[0], (self.mask,)):
            with torch.inference_mode(False):
                self._index = (_stamp((self.mask,)), _unpack_support(self.mask, self.atoms, self.nnz))
        return self._index[1]

    def _current_plan(self, dictionary: torch.Tensor) -> tuple[str, torch.Tensor]:
        """``(exec_path, C)`` for the factored path, ``(exec_path, W~)`` for the dense one; cached, the weight stored
        in the layout ``lrc_fast.prefer_layout`` picks (column-major when it has more rows than columns)."""
        sources = (self._parameters["values"], self._buffers["mask"], dictionary)
        plan = self._plan
        if plan is None or not _fresh(plan[0], sources):
            with torch.no_grad(), torch.inference_mode(False):  # plain tensors, usable in any later mode
                weight = self.coefficients()
                if self.exec_path == "dense":
                    weight = weight @ dictionary
                if weight.shape[0] > weight.shape[1]:
                    weight = weight.t().contiguous().t()
            self._plan = plan = (_stamp(sources), self.exec_path, weight)
        return plan[1], plan[2]

    def _apply(self, fn, *args, **kwargs):
        self.reset_plan()  # .to(), .half(), .cuda(): the cache would stay behind
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_plan": None, "_index": None}  # weak references do not pickle

    def __deepcopy__(self, memo: dict) -> DictLinear:
        """Copy everything but the owner of a sharer: the copy uses the owner's copy when the same ``deepcopy`` copies
        the owner too (a whole model, whichever comes first), else the original owner (a copied block shares the
        dictionary of the model it came from instead of duplicating it)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = {k: v for k, v in self.__getstate__().items() if k != "_owner"}
        new.__setstate__(copy.deepcopy(state, memo))
        new._owner = None
        pending = memo.setdefault(_PENDING_OWNERS, {})
        for sharer in pending.pop(id(self), ()):  # sharers copied before their owner
            sharer._owner = [new]
        if self._owner is not None:
            owner = self._owner[0]
            new._owner = [memo.get(id(owner), owner)]
            if id(owner) not in memo:
                pending.setdefault(id(owner), []).append(new)
        return new

    def extra_repr(self) -> str:
        shared = f", shared_from={self.shared_from!r}" if self.shared_from is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.atoms}, "
                f"nnz={self.nnz}, bias={self.bias is not None}{shared}")


_PENDING_OWNERS = "lrc.DictLinear.pending_owners"  # deepcopy memo key: owner id -> sharer copies made before it


def _stamp(tensors) -> tuple:
    """What identifies the contents of ``tensors`` for a cache: object (weakly), version, storage address; a dtype or
    device change (``.data`` assigned, ``_apply``) gives a new address."""
    return tuple((weakref.ref(t), 0 if t.is_inference() else t._version, t.data_ptr()) for t in tensors)


def _fresh(stamp: tuple, tensors) -> bool:
    for (ref, version, ptr), t in zip(stamp, tensors):
        if ref() is not t or ptr != t.data_ptr() or version != (0 if t.is_inference() else t._version):
            return False
    return True


def _check_support(index: torch.Tensor, values: torch.Tensor, atoms: int) -> None:
    """A one-line ``ValueError`` unless ``index`` (out x nnz) holds distinct atoms ``< atoms`` per row, shaped as
    ``values``."""
    if index.dim() != 2 or index.shape != values.shape or not 0 < index.shape[1] <= atoms:
        raise ValueError(f"DictLinear: index {tuple(index.shape)} and values {tuple(values.shape)} must both be "
                         f"out x nnz with 0 < nnz <= {atoms} atoms")
    if index.numel() and (index.min() < 0 or index.max() >= atoms or (index.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError(f"DictLinear: each row of index must hold distinct atoms in 0..{atoms - 1}")


_BITS = 8


def _pack_support(index: torch.Tensor, atoms: int) -> torch.Tensor:
    """out x ceil(atoms / 8) uint8: bit ``a % 8`` of byte ``a // 8`` of row ``j`` set iff ``a`` is in ``index[j]``."""
    rows, nbytes = index.shape[0], (atoms + _BITS - 1) // _BITS
    bits = torch.zeros(rows, nbytes * _BITS, dtype=torch.uint8, device=index.device).scatter_(1, index, 1)
    weights = 1 << torch.arange(_BITS, device=index.device)
    return (bits.view(rows, nbytes, _BITS).long() * weights).sum(-1).to(torch.uint8)


def _unpack_support(mask: torch.Tensor, atoms: int, nnz: int) -> torch.Tensor:
    """The atoms set in each row of a packed ``mask`` (out x nnz, ascending); a ``ValueError`` unless every row has
    exactly ``nnz`` bits, all below ``atoms``."""
    shifts = torch.arange(_BITS, device=mask.device, dtype=torch.uint8)
    bits = ((mask.unsqueeze(-1) >> shifts) & 1).flatten(1)
    bad = ((bits[:, :atoms].sum(1) != nnz) | bits[:, atoms:].any(1)).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(f"DictLinear: the support mask must set exactly {nnz} of the {atoms} atoms in every row "
                         f"(row {row} sets {int(bits[row].sum())} bits)")
    return bits.nonzero()[:, 1].view(mask.shape[0], nnz)


def build_dictionary(spec: dict, dtype=None, base=None, build=None) -> nn.Module:
    """``dictionary``: ``in_features``, ``out_features``, ``atoms``, ``nnz``, ``bias`` and optional ``shared_from``,
    the full name of the module whose dictionary it uses (linked by ``DictLinear.lrc_link`` once every module is
    built; the sharer stores no dictionary)."""
    return DictLinear(spec["in_features"], spec["out_features"], spec["atoms"], spec["nnz"], spec.get("bias", False),
                      shared_from=spec.get("shared_from"), dtype=dtype)
