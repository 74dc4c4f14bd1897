"""Self-contained loader for lrc checkpoints (imports only torch and transformers).

lrc copies this file into every compressed checkpoint. ``config.json`` has ``model_type: "lrc"``, so plain
transformers refuses the checkpoint unless ``trust_remote_code=True`` lets it run this file (with the base model type
it would build a dense model, re-initialise every factorised weight and return garbage). ``auto_map`` names:

- ``AutoConfig`` -> ``LrcConfig``: the base model's config (a subclass of e.g. ``LlamaConfig``) with model type lrc;
- ``AutoModelForCausalLM`` -> ``LrcForCausalLM``: the base causal LM with the compressed modules swapped in;
- ``AutoModel`` -> ``LrcModel``: the same for the bare decoder (e.g. ``LlamaModel``), which is what transformers'
  remote-code path of serving stacks builds (vLLM's Transformers backend).

It is architecture-generic: the ``lrc`` section names the base (``base_model_type``, ``base_architecture``) and
describes every replaced module as data (``modules[name] = {type, ...}``); the loader subclasses the base transformers
classes, swaps those modules in, and lets transformers load the safetensors weights.

Module types (add new ones to ``MODULE_TYPES``):
- ``lowrank``: ``LowRankLinear`` with ``in_features``, ``out_features``, ``rank``, ``bias``.
- ``dense``: a plain ``nn.Linear`` with possibly new ``in_features``/``out_features`` (resized matrices).
- ``dictionary``: ``DictLinear`` (CoSpaDi) with ``in_features``, ``out_features``, ``atoms``, ``nnz``, ``bias`` and
  optional ``shared_from``, the full name of the module whose dictionary it uses (linked by ``link_shared`` once every
  module is built; the sharer stores no dictionary).
- ``compensated``: ``CompensatedLinear``, any of the above (``base``) plus a residual path of ``rank`` (EoRA).
- ``attention``: ``LrcAttention``, the base model's attention with q/k head dim ``qk_dim`` and v/o head dim
  ``vo_dim`` (``num_heads``, ``num_kv_heads``, ``head_dim``, ``hidden_size``, ``bias`` {q, k, v, o}; MoDeGPT).

Format versions (``lrc.format_version``): 1 kept the base ``model_type`` in config.json; 2 is ``model_type: "lrc"``
with ``lrc.base_model_type``. Format 1 is migrated in memory (``upgrade_section``); a newer format is refused.
"""
from __future__ import annotations

import copy
import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

LRC_FORMAT_VERSION = 2
AUTO_MAP = {"AutoConfig": "modeling_lrc.LrcConfig", "AutoModel": "modeling_lrc.LrcModel",
            "AutoModelForCausalLM": "modeling_lrc.LrcForCausalLM"}
# from_pretrained arguments that locate config.json (the rest are for the model)
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


class LowRankLinear(nn.Module):
    """``y = second(first(x))``: ``first`` is ``B`` (rank x in, no bias), ``second`` is ``A`` (out x rank, bias).

    Stores ``rank * (in + out)`` weights instead of ``in * out``. Drop-in for ``nn.Linear`` (same in/out features).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def weight_approx(self) -> torch.Tensor:
        """The dense matrix ``A B`` this module applies (materialised; for analysis, not for the forward)."""
        return self.second.weight @ self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.second.bias is not None}")


class CompensatedLinear(nn.Module):
    """``y = base(x) + lora_B(lora_A(x))``: a compressed module plus a low-rank residual path (EoRA). The residual
    uses PEFT's names and shapes (``lora_A`` rank x in, ``lora_B`` out x rank, scaling 1)."""

    def __init__(self, base: nn.Module, rank: int, device=None, dtype=None):
        super().__init__()
        self.base, self.rank = base, rank
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)

    @property
    def weight_approx(self) -> torch.Tensor:
        base = self.base.weight_approx if hasattr(self.base, "weight_approx") else self.base.weight
        return base + self.lora_B.weight @ self.lora_A.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


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
        if self.shared_from is None:
            return self.dictionary.weight
        if self._owner is None:
            raise RuntimeError(f"DictLinear shares the dictionary of {self.shared_from!r} but is not linked to it "
                               "(call link(owner); lrc checkpoints: link_shared)")
        return self._owner[0].dictionary.weight

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
        if self._wants_grad():
            coeff = self.coefficients()
            if self.exec_path == "factored":
                return F.linear(F.linear(x, self.dict_weight), coeff, self.bias)
            return F.linear(x, coeff @ self.dict_weight, self.bias)
        path, weight = self._current_plan()
        if path == "factored":
            return F.linear(F.linear(x, self.dict_weight), weight, self.bias)
        return F.linear(x, weight, self.bias)

    def storage_bytes(self) -> int:
        """Bytes this module writes to a checkpoint: values, mask, bias and the dictionary if it owns it."""
        tensors = [self.values, self.mask, self.bias, None if self.shared_from else self.dictionary.weight]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def reset_plan(self) -> None:
        """Drop the cached plan and support (after writing the tensors through ``.data``)."""
        self._plan = self._index = None

    def _wants_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.training or any(
            t is not None and t.requires_grad for t in (self.values, self.bias, self.dict_weight)))

    def _support(self) -> torch.Tensor:
        """``support()``, cached until ``mask`` changes."""
        if self._index is None or not _fresh(self._index[0], (self.mask,)):
            with torch.inference_mode(False):
                self._index = (_stamp((self.mask,)), _unpack_support(self.mask, self.atoms, self.nnz))
        return self._index[1]

    def _current_plan(self) -> tuple[str, torch.Tensor]:
        """``(exec_path, C)`` for the factored path, ``(exec_path, W~)`` for the dense one; cached."""
        sources = (self.values, self.mask, self.dict_weight)
        if self._plan is None or not _fresh(self._plan[0], sources):
            with torch.no_grad(), torch.inference_mode(False):  # plain tensors, usable in any later mode
                weight = self.coefficients()
                if self.exec_path == "dense":
                    weight = weight @ self.dict_weight
            self._plan = (_stamp(sources), self.exec_path, weight)
        return self._plan[1:]

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
    """What identifies the contents of ``tensors`` for a cache: object, version, storage, device, dtype."""
    return tuple((weakref.ref(t), *_state(t)) for t in tensors)


def _state(t: torch.Tensor) -> tuple:
    return (0 if t.is_inference() else t._version), t.data_ptr(), t.device, t.dtype


def _fresh(stamp: tuple, tensors) -> bool:
    return all(ref() is t and tuple(rest) == _state(t) for (ref, *rest), t in zip(stamp, tensors))


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


class LrcAttention(nn.Module):
    """The base model's attention (``LlamaAttention``, ``Qwen3Attention``...) with q/k head dim ``qk_dim`` and v/o head
    dim ``vo_dim`` (MoDeGPT). It keeps the base's attributes (``scaling`` = 1/sqrt(original ``head_dim``),
    ``sliding_window``...) and per-head ``q_norm``/``k_norm``; ``LrcAttention(base, spec)`` is also an instance of the
    base's class (transformers finds attention modules by class for ``output_attentions``). ``rope_index``
    (``num_kv_heads x qk_dim``) holds per KV group the kept dims of the original head, ``[p_1..p_m, p_1+d/2..p_m+d/2]``:
    closed under ``rotate_half``'s pairs, so RoPE with cos/sin gathered there is exact (identity at full size)."""

    _lrc_base_class = None  # set on the subclasses made by _attention_class
    _lrc_eager = None  # the base family's eager_attention_forward

    def __new__(cls, base: nn.Module, *args, **kwargs):
        if cls._lrc_base_class is None:
            cls = _attention_class(getattr(type(base), "_lrc_base_class", None) or type(base))
        return super().__new__(cls)

    def __init__(self, base: nn.Module, spec: dict, dtype=None):
        nn.Module.__init__(self)
        hidden, heads, kv_heads, head_dim, qk, vo = _check_attention(spec, base)
        for key, value in vars(base).items():  # config, layer_idx, scaling, attention_dropout, is_causal, ...
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        if "sliding_window" not in vars(base):  # Mistral passes its config's; Llama's config has none
            self.sliding_window = getattr(self.config, "sliding_window", None)
        self.q_norm, self.k_norm = getattr(base, "q_norm", None), getattr(base, "k_norm", None)
        self.num_heads, self.num_key_value_heads, self.num_key_value_groups = heads, kv_heads, heads // kv_heads
        self.head_dim, self.qk_dim, self.vo_dim = head_dim, qk, vo
        kw, bias = {"device": next((p.device for p in base.parameters()), None), "dtype": dtype}, spec["bias"]
        self.q_proj = nn.Linear(hidden, heads * qk, bias=bias["q"], **kw)
        self.k_proj = nn.Linear(hidden, kv_heads * qk, bias=bias["k"], **kw)
        self.v_proj = nn.Linear(hidden, kv_heads * vo, bias=bias["v"], **kw)
        self.o_proj = nn.Linear(heads * vo, hidden, bias=bias["o"], **kw)
        pairs = torch.arange(qk // 2, device=kw["device"])  # default: the first qk/2 pairs (identity at full size)
        self.register_buffer("rope_index", torch.cat((pairs, pairs + head_dim // 2)).repeat(kv_heads, 1))
        self.train(base.training)

    @classmethod
    def from_base(cls, base: nn.Module, qk_dim: int, vo_dim: int, rope_index=None, bias: dict | None = None,
                  dtype=None) -> LrcAttention:
        """An empty (weights not set) module to replace ``base``, with ``rope_index`` (``num_kv_heads x qk_dim``,
        pair-closed; default: the first ``qk_dim / 2`` pairs) and ``bias`` (``{"q", "k", "v", "o"}`` -> bool; the
        base's biases where absent)."""
        heads = getattr(base, "num_heads", None) or base.config.num_attention_heads
        kv_heads = getattr(base, "num_key_value_heads", None) or getattr(base.config, "num_key_value_heads", heads)
        bias = {n: getattr(getattr(base, f"{n}_proj"), "bias", None) is not None for n in "qkvo"} | (bias or {})
        module = cls(base, {"type": "attention", "hidden_size": base.q_proj.in_features, "num_heads": heads,
                            "num_kv_heads": kv_heads, "head_dim": base.head_dim, "qk_dim": qk_dim, "vo_dim": vo_dim,
                            "bias": bias}, dtype=dtype or _float_dtype(base))
        if rope_index is not None:
            index, m, half = torch.as_tensor(rope_index, dtype=torch.long).cpu(), qk_dim // 2, base.head_dim // 2
            first = index[:, :m] if index.dim() == 2 else index
            if index.shape != (kv_heads, qk_dim) or not torch.equal(index[:, m:], first + half) or \
                    not bool(((first >= 0) & (first < half)).all()) or (first.sort().values.diff() == 0).any() or \
                    (qk_dim == 2 * half and not torch.equal(index, module.rope_index.cpu())):
                raise ValueError(f"lrc attention: rope_index must be {kv_heads} x {qk_dim} rows [p_1..p_m, p_1+{half}.."
                                 f"p_m+{half}] with distinct p < {half} (closed under RoPE pairs; identity if full)")
            module.rope_index.copy_(index)
        return module

    def spec(self) -> dict:
        """This module's entry in ``lrc.modules``."""
        return {"type": "attention", "hidden_size": self.q_proj.in_features, "num_heads": self.num_heads,
                "num_kv_heads": self.num_key_value_heads, "head_dim": self.head_dim, "qk_dim": self.qk_dim,
                "vo_dim": self.vo_dim, "bias": {n: getattr(self, f"{n}_proj").bias is not None for n in "qkvo"}}

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] = None,
                attention_mask: torch.Tensor | None = None, past_key_values=None, **kwargs):
        """As ``LlamaAttention.forward`` (``**kwargs`` go to the attention function), with the kept head dims."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*shape, -1, self.qk_dim)
        key = self.k_proj(hidden_states).view(*shape, -1, self.qk_dim)
        query = (query if self.q_norm is None else self.q_norm(query)).transpose(1, 2)
        key = (key if self.k_norm is None else self.k_norm(key)).transpose(1, 2)
        value = self.v_proj(hidden_states).view(*shape, -1, self.vo_dim).transpose(1, 2)
        cos, sin = position_embeddings  # (batch, seq, head_dim)
        if self.qk_dim == self.head_dim:
            cos_k, sin_k = cos_q, sin_q = cos.unsqueeze(1), sin.unsqueeze(1)
        else:  # (batch, kv_heads, seq, qk_dim), repeated for the query heads of each group
            cos_k, sin_k = cos[..., self.rope_index].transpose(1, 2), sin[..., self.rope_index].transpose(1, 2)
            cos_q, sin_q = (t.repeat_interleave(self.num_key_value_groups, dim=1) for t in (cos_k, sin_k))
        query, key = (query * cos_q) + (_rotate_half(query) * sin_q), (key * cos_k) + (_rotate_half(key) * sin_k)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, type(self)._lrc_eager)
        output, weights = interface(self, query, key, value, attention_mask, scaling=self.scaling,
                                    dropout=0.0 if not self.training else self.attention_dropout,
                                    sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(output.reshape(*shape, -1).contiguous()), weights

    def __reduce_ex__(self, protocol):
        """Pickle by base class: the class is made at run time and cannot be found by its name."""
        return _empty_attention, (type(self)._lrc_base_class,), self.__getstate__()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def _check_attention(spec: dict, base: nn.Module) -> tuple[int, ...]:
    """``(hidden_size, num_heads, num_kv_heads, head_dim, qk_dim, vo_dim)`` of an attention spec that fits ``base``,
    else a one-line ``ValueError``."""
    name, keys = type(base).__name__, ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "qk_dim", "vo_dim")
    try:
        hidden, heads, kv_heads, head_dim, qk, vo = dims = tuple(int(spec[k]) for k in keys)
        spec = {**spec, "bias": {n: bool(spec["bias"][n]) for n in "qkvo"}}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"lrc attention: bad spec {spec!r} ({type(e).__name__}: {e})") from None
    found = (getattr(getattr(base, "q_proj", None), "in_features", None), getattr(base, "head_dim", None),
             getattr(base, "num_heads", None) or getattr(getattr(base, "config", None), "num_attention_heads", None))
    if found != (hidden, head_dim, heads) or heads % kv_heads or qk % 2 or not (0 < qk <= head_dim >= vo > 0):
        raise ValueError(f"lrc attention: spec {spec!r} does not fit {name} (hidden size, head dim, heads: {found})")
    norms = [n for n in ("q_norm", "k_norm") if getattr(base, n, None) is not None]
    if qk < head_dim and norms:
        raise ValueError(f"lrc attention: {name} normalises each q/k head over its {head_dim} dims "
                         f"({', '.join(norms)}), so qk_dim {qk} < {head_dim} cannot be exact; keep q/k whole here")
    if getattr(base, "attn_logit_softcapping", None) or getattr(getattr(base, "config", None),
                                                                 "attn_logit_softcapping", None):
        raise ValueError(f"lrc attention: {name} soft-caps its attention logits, which this module does not do")
    other = [n for n, _ in base.named_children() if n not in ("q_proj", "k_proj", "v_proj", "o_proj", *norms)]
    other += [n for n, _ in (*base.named_parameters(recurse=False), *base.named_buffers(recurse=False))
              if n != "rope_index"]
    if other or any(getattr(getattr(base, n), "weight", torch.empty(head_dim)).shape != (head_dim,) for n in norms):
        raise ValueError(f"lrc attention: {name} ({', '.join(other) or 'q/k norms not per head'}) is not supported")
    return dims


@functools.lru_cache(maxsize=None)
def _attention_class(base: type) -> type:
    """``LrcAttention`` for one base attention class: a subclass of both, with that family's eager attention."""
    import sys

    eager = getattr(sys.modules.get(base.__module__), "eager_attention_forward", None)
    if eager is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as eager
    return type("LrcAttention", (LrcAttention, base), {
        "__module__": __name__, "__qualname__": "LrcAttention", "__doc__": LrcAttention.__doc__,
        "_lrc_base_class": base, "_lrc_eager": staticmethod(eager)})


def _empty_attention(base: type) -> nn.Module:
    return nn.Module.__new__(_attention_class(base))


def _lowrank(spec: dict, dtype=None, base=None) -> nn.Module:
    return LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], spec.get("bias", False), dtype=dtype)


def _dense(spec: dict, dtype=None, base=None) -> nn.Module:
    return nn.Linear(spec["in_features"], spec["out_features"], bias=spec.get("bias", False), dtype=dtype)


def _compensated(spec: dict, dtype=None, base=None) -> nn.Module:
    return CompensatedLinear(build_module(spec["base"], dtype=dtype, base=base), spec["rank"], dtype=dtype)


def _dictionary(spec: dict, dtype=None, base=None) -> nn.Module:
    return DictLinear(spec["in_features"], spec["out_features"], spec["atoms"], spec["nnz"], spec.get("bias", False),
                      shared_from=spec.get("shared_from"), dtype=dtype)


def _attention(spec: dict, dtype=None, base=None) -> nn.Module:
    if base is None:
        raise ValueError("lrc checkpoint: an attention module is built from the base model's attention module")
    return LrcAttention(base, spec, dtype=dtype)


# builder(spec, dtype=None, base=None): ``base`` is the module being replaced
MODULE_TYPES = {"lowrank": _lowrank, "dense": _dense, "compensated": _compensated, "attention": _attention,
                "dictionary": _dictionary}


def build_module(spec: dict, dtype=None, base: nn.Module | None = None) -> nn.Module:
    """An empty module of the structure ``spec`` describes (weights are loaded afterwards), replacing ``base``."""
    try:
        return MODULE_TYPES[spec["type"]](spec, dtype=dtype, base=base)
    except KeyError as e:
        raise ValueError(f"lrc checkpoint: unknown module type {spec.get('type')!r}; this loader knows "
                         f"{sorted(MODULE_TYPES)}") from e


def _float_dtype(module: nn.Module):
    """The dtype of ``module``'s first floating-point parameter: a module replaced earlier (``CompensatedLinear``,
    ``LowRankLinear``) has no ``.weight`` of its own, and its replacement must keep the model's dtype."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def apply_structure(model: nn.Module, modules: dict, prefix: str = "") -> None:
    """Replace every module named in ``modules`` by an empty module of the described type, in place, in the dtype of
    the module it replaces. Parents go before their children (an attention module before its ``q_proj``). Then link
    the modules that share a dictionary to their owners (``link_shared``; ``prefix`` as there)."""
    for name in sorted(modules, key=lambda n: n.count(".")):
        base = model.get_submodule(name)
        model.set_submodule(name, build_module(modules[name], dtype=_float_dtype(base), base=base))
    link_shared(model, modules, prefix)


def link_shared(model: nn.Module, modules: dict, prefix: str = "") -> None:
    """``link`` every ``DictLinear`` whose spec in ``modules`` has ``shared_from`` (also as the ``base`` of a
    ``compensated`` spec) to its owner in ``model``. Both names lose ``prefix`` where they start with it (the
    ``lrc.modules`` names of a bare decoder start with ``model.``)."""
    for name, spec in modules.items():
        owner = _shared_from(spec)
        if owner is not None:
            _find_dict_linear(model, name, prefix).link(_find_dict_linear(model, owner, prefix))


def _shared_from(spec: dict) -> str | None:
    while spec.get("type") == "compensated":
        spec = spec["base"]
    return spec.get("shared_from") if spec.get("type") == "dictionary" else None


def _find_dict_linear(model: nn.Module, name: str, prefix: str) -> DictLinear:
    """The ``DictLinear`` named ``name`` in ``model`` (or the ``base`` of the ``CompensatedLinear`` there)."""
    try:
        module = model.get_submodule(name[len(prefix):] if prefix and name.startswith(prefix) else name)
    except AttributeError:
        module = None
    while isinstance(module, CompensatedLinear):
        module = module.base
    if not isinstance(module, DictLinear):
        raise ValueError(f"lrc checkpoint: {name!r} is no dictionary module of this model (shared dictionaries link "
                         f"a DictLinear to the DictLinear that owns the dictionary)")
    return module


def upgrade_section(section: dict, model_type: str | None = None) -> dict:
    """The ``lrc`` section in the current format. ``model_type`` is config.json's, the base model type in format 1.

    A format newer than this loader is refused with a one-line ``ValueError``."""
    version = section.get("format_version", 1)
    if not isinstance(version, int) or version > LRC_FORMAT_VERSION:
        raise ValueError(f"lrc checkpoint format {version} is newer than this loader (format {LRC_FORMAT_VERSION}); "
                         "upgrade lrc, or load it with trust_remote_code=True and the modeling_lrc.py it ships")
    if version < 2 and model_type not in (None, "lrc"):
        section = {**section, "base_model_type": model_type}
    return {**section, "format_version": LRC_FORMAT_VERSION}


def _lrc_section(config) -> dict:
    """The upgraded ``lrc`` section of a config object or of a config.json dict."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    section = get("lrc")
    if not isinstance(section, dict) or "modules" not in section:
        raise ValueError("not an lrc checkpoint: config.json has no 'lrc' section with 'modules'")
    return upgrade_section(section, get("model_type"))


def _transformers_class(name: str | None) -> type:
    import transformers

    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"lrc checkpoint: transformers {transformers.__version__} has no class {name!r}")
    return cls


_LAZY = ("LrcConfig", "LrcPreTrainedModel", "LrcForCausalLM", "LrcModel")


def __getattr__(name: str):
    """The classes in ``_LAZY`` are defined on first access (``transformers``' remote-code loader reads them with
    ``getattr`` too): they subclass transformers classes whose import takes seconds, and lrc imports this file for its
    module types in every command."""
    if name in _LAZY:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _classes() -> dict:
    """Define the config and model classes once and publish them as module attributes."""
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel

    class LrcConfig(PretrainedConfig):
        """The config of an lrc checkpoint: the base model's config and the ``lrc`` section, under model type lrc.

        Built with an ``lrc`` section that names the base model type, it returns an instance of
        ``lrc_config_class(base_model_type)``, a subclass of this class and of the base config class
        (``LlamaConfig``...), so that the base modeling code finds every field, default and property it reads."""

        __qualname__ = "LrcConfig"
        model_type = "lrc"

        def __new__(cls, *args, **kwargs):
            section = kwargs.get("lrc")
            if cls is LrcConfig and isinstance(section, dict):
                base = upgrade_section(section, kwargs.get("model_type")).get("base_model_type")
                if base:
                    cls = lrc_config_class(base)
            return super().__new__(cls)

        def __init__(self, lrc: dict | None = None, **kwargs):
            model_type = kwargs.pop("model_type", None)  # the class says "lrc"; format 1 wrote the base type here
            if lrc is not None:
                lrc = upgrade_section(lrc, model_type)
                kwargs["auto_map"] = {**AUTO_MAP, **(kwargs.get("auto_map") or {})}
            super().__init__(**kwargs)
            self.lrc = lrc

        def __reduce__(self):
            """Pickle by base model type: the class is made at run time and cannot be found by its name."""
            return _empty_config, (getattr(type(self), "_lrc_base_type", None),), self.__dict__.copy()

    class LrcPreTrainedModel(PreTrainedModel):
        """Base of the entry classes ``auto_map`` names. An entry class holds nothing itself: ``from_pretrained`` and
        ``_from_config`` build ``compressed_class(entry, base)``, a subclass of the entry and of the transformers class
        of the base model (an instance is both an ``LrcForCausalLM`` and a ``LlamaForCausalLM``), whose constructor
        swaps in the modules that ``config.lrc`` describes."""

        __qualname__ = "LrcPreTrainedModel"
        config_class = LrcConfig
        _lrc_base = None  # the transformers class a compressed class extends; None on the entry classes
        _lrc_prefix = ""  # the prefix of this class's module names in lrc.modules ("model." for the bare decoder)
        _supports_attention_backend = True  # vLLM asks the entry class; a compressed class keeps its base's flag

        @classmethod
        def _base(cls, section: dict) -> tuple[type, str]:
            raise NotImplementedError

        @classmethod
        def _compressed_for(cls, config) -> type:
            return compressed_class(cls, *cls._base(_lrc_section(config)))

        def __init__(self, config, *args, **kwargs):
            if self._lrc_base is None:
                raise TypeError(f"{type(self).__name__} picks its class from the checkpoint: use "
                                f"{type(self).__name__}.from_pretrained(dir) or AutoModel*.from_config(config)")
            super().__init__(config, *args, **kwargs)
            cut = len(self._lrc_prefix)
            apply_structure(self, {name[cut:]: spec for name, spec in _lrc_section(config)["modules"].items()
                                   if name.startswith(self._lrc_prefix)}, prefix=self._lrc_prefix)

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
            if cls._lrc_base is not None:
                return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
            if isinstance(config, PretrainedConfig):
                target = cls._compressed_for(config)
            else:
                hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
                target = cls._compressed_for(
                    PretrainedConfig.get_config_dict(config or pretrained_model_name_or_path, **hub)[0])
            return target.from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

        @classmethod
        def _from_config(cls, config, **kwargs):
            if cls._lrc_base is None:
                return cls._compressed_for(config)._from_config(config, **kwargs)
            return super()._from_config(config, **kwargs)

    class LrcForCausalLM(LrcPreTrainedModel, GenerationMixin):
        """``AutoModelForCausalLM``: the base causal LM (``lrc.base_architecture``) with the compressed modules."""

        __qualname__ = "LrcForCausalLM"
        _auto_class = "AutoModelForCausalLM"  # save_pretrained copies this file and keeps auto_map

        @classmethod
        def _base(cls, section: dict) -> tuple[type, str]:
            return _transformers_class(section.get("base_architecture")), ""

    class LrcModel(LrcPreTrainedModel):
        """``AutoModel``: the bare decoder that transformers' AutoModel builds for the base model type (``LlamaModel``
        for llama), with the compressed modules under it. Serving stacks that put their own LM head on a decoder
        through transformers' remote-code path build this class (vLLM's Transformers backend)."""

        __qualname__ = "LrcModel"
        _auto_class = "AutoModel"

        @classmethod
        def _base(cls, section: dict) -> tuple[type, str]:
            from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

            name = MODEL_MAPPING_NAMES.get(section.get("base_model_type"))
            causal = _transformers_class(section.get("base_architecture"))
            return _transformers_class(name if isinstance(name, str) else (name or (None,))[0]), \
                f"{causal.base_model_prefix}."

    classes = {"LrcConfig": LrcConfig, "LrcPreTrainedModel": LrcPreTrainedModel, "LrcForCausalLM": LrcForCausalLM,
               "LrcModel": LrcModel}
    globals().update(classes)
    return classes


def _empty_config(base_model_type: str | None):
    return object.__new__(lrc_config_class(base_model_type) if base_model_type else _classes()["LrcConfig"])


@functools.lru_cache(maxsize=None)
def lrc_config_class(base_model_type: str) -> type:
    """``LrcConfig`` for one base model type (e.g. ``llama``): a subclass of ``LrcConfig`` and ``LlamaConfig``."""
    import transformers

    try:
        base = transformers.CONFIG_MAPPING[base_model_type]
    except KeyError:
        raise ValueError(f"lrc checkpoint: transformers {transformers.__version__} does not know the base model type "
                         f"{base_model_type!r}") from None
    lrc = _classes()["LrcConfig"]
    return type("LrcConfig", (lrc, base), {
        "__module__": __name__, "__qualname__": "LrcConfig", "__doc__": lrc.__doc__,
        "__init__": lrc.__init__,  # a dataclass config would otherwise get a generated one
        "model_type": "lrc", "_lrc_base_type": base_model_type,
        "base_model_tp_plan": None,  # tensor-parallel plans name dense Linears; factorised modules fit none
    })


@functools.lru_cache(maxsize=None)
def compressed_class(entry: type, base: type, prefix: str = "") -> type:
    """The class of ``entry`` for one base transformers class, named like the entry (``save_pretrained`` writes
    ``architectures: ["LrcForCausalLM"]``) and keeping the base's attention-backend flag."""
    return type(entry.__name__, (entry, base), {
        "__module__": entry.__module__, "__qualname__": entry.__qualname__, "__doc__": entry.__doc__,
        "_lrc_base": base, "_lrc_prefix": prefix, "config_class": _classes()["LrcConfig"],
        "_supports_attention_backend": getattr(base, "_supports_attention_backend", False),
    })
