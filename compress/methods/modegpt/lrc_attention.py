"""MoDeGPT's module type ``attention`` (imports only torch, lrc's core remote files and, at call time,
transformers): ``LrcAttention``, the base model's attention with fewer q/k and v/o head dims, architecture-generic.
Written into the remote code of every checkpoint that has one (``checkpoint/save.py``: its imports of the core files
are made relative to the checkpoint directory there)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoint.lrc_fast import FAST_PATH, FusedWeights, fusable, plain
from ...checkpoint.lrc_layers import _float_dtype


class LrcAttention(nn.Module):
    """The base model's attention (``LlamaAttention``, ``Qwen3Attention``...) with q/k head dim ``qk_dim`` and v/o head
    dim ``vo_dim`` (MoDeGPT). It keeps the base's attributes (``scaling`` = 1/sqrt(original ``head_dim``),
    ``sliding_window``...) and per-head ``q_norm``/``k_norm``; ``LrcAttention(base, spec)`` is also an instance of the
    base's class (transformers finds attention modules by class for ``output_attentions``). ``rope_index``
    (``num_kv_heads x qk_dim``) holds per KV group the kept dims of the original head, ``[p_1..p_m, p_1+d/2..p_m+d/2]``:
    closed under ``rotate_half``'s pairs, so RoPE with cos/sin gathered there is exact (identity at full size).

    With ``fast`` and ``fuse`` (``lrc_fast.py``; ``modeling_lrc.set_fast_path``) q/k/v, when they are plain Linears,
    are applied as one GEMM without autograd, their weights row blocks of one buffer (``lrc_fast.FusedWeights``)."""

    _lrc_base_class = None  # set on the subclasses made by _attention_class
    _lrc_eager = None  # the base family's eager_attention_forward
    fast, fuse, _fused = FAST_PATH, False, None  # fuse: on when a checkpoint loads (set_fast_path)

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
                attention_mask: torch.Tensor | None = None, past_key_values=None, cache=None, **kwargs):
        """As ``LlamaAttention.forward`` (``**kwargs`` go to the attention function), with the kept head dims. The
        KV cache arrives as ``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier)."""
        past_key_values = cache if cache is not None else past_key_values
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        shape = hidden_states.shape[:-1]
        query, key, value = self._qkv(hidden_states)
        query, key = query.view(*shape, -1, self.qk_dim), key.view(*shape, -1, self.qk_dim)
        query = (query if self.q_norm is None else self.q_norm(query)).transpose(1, 2)
        key = (key if self.k_norm is None else self.k_norm(key)).transpose(1, 2)
        value = value.view(*shape, -1, self.vo_dim).transpose(1, 2)
        cos, sin = position_embeddings  # (batch, seq, head_dim)
        if self.qk_dim == self.head_dim:
            cos_k, sin_k = cos_q, sin_q = cos.unsqueeze(1), sin.unsqueeze(1)
        else:  # (batch, kv_heads, seq, qk_dim), repeated for the query heads of each group
            cos_k, sin_k = cos[..., self.rope_index].transpose(1, 2), sin[..., self.rope_index].transpose(1, 2)
            cos_q, sin_q = (t.repeat_interleave(self.num_key_value_groups, dim=1) for t in (cos_k, sin_k))
        query, key = (query * cos_q) + (_rotate_half(query) * sin_q), (key * cos_k) + (_rotate_half(key) * sin_k)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        impl = self.config._attn_implementation
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, type(self)._lrc_eager)
        pad = self.qk_dim - self.vo_dim if impl not in (None, "eager") else 0
        if pad > 0:  # fused kernels (SDPA's flash path) need one head size: zero columns change no product
            value = F.pad(value, (0, pad))
        elif pad < 0:
            query, key = F.pad(query, (0, -pad)), F.pad(key, (0, -pad))
        output, weights = interface(self, query, key, value, attention_mask, scaling=self.scaling,
                                    dropout=0.0 if not self.training else self.attention_dropout,
                                    sliding_window=self.sliding_window, **kwargs)
        if pad > 0:
            output = output[..., :self.vo_dim]
        return self.o_proj(output.reshape(*shape, -1).contiguous()), weights

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q_proj(x), k_proj(x), v_proj(x))``, as one GEMM when the fast path allows it."""
        projections = self._modules["q_proj"], self._modules["k_proj"], self._modules["v_proj"]
        if self.fuse and self.fast and fusable(x) and all(plain(m) for m in projections):
            if self._fused is None:
                self._fused = FusedWeights()
            fused = self._fused.get(projections)
            if fused is not None:
                weight, bias, bounds = fused
                out = F.linear(x, weight, bias)
                return tuple(out[..., start:stop] for start, stop in bounds)
        return tuple(m(x) for m in projections)

    def lrc_fast_path(self, fast: bool, fuse: bool, layout: bool) -> None:
        """``modeling_lrc.set_fast_path``: the fast path and the q/k/v fusion (its Linears are plain)."""
        self.fast, self.fuse = fast, fast and fuse

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_fused": None}  # a copy's parameters are its own again

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


def build_attention(spec: dict, dtype=None, base=None, build=None) -> nn.Module:
    """``attention``: the base model's attention (``base``) with q/k head dim ``qk_dim`` and v/o head dim ``vo_dim``
    (``num_heads``, ``num_kv_heads``, ``head_dim``, ``hidden_size``, ``bias`` {q, k, v, o})."""
    if base is None:
        raise ValueError("lrc checkpoint: an attention module is built from the base model's attention module")
    return LrcAttention(base, spec, dtype=dtype)
