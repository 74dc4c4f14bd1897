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
- ``compensated``: ``CompensatedLinear``, any of the above (``base``) plus a residual path of ``rank`` (EoRA).
- ``attention``: ``LrcAttention``, the base model's attention with q/k head dim ``qk_dim`` and v/o head dim
  ``vo_dim`` (``num_heads``, ``num_kv_heads``, ``head_dim``, ``hidden_size``, ``bias`` {q, k, v, o}; MoDeGPT).

Format versions (``lrc.format_version``): 1 kept the base ``model_type`` in config.json; 2 is ``model_type: "lrc"``
with ``lrc.base_model_type``. Format 1 is migrated in memory (``upgrade_section``); a newer format is refused.
"""
from __future__ import annotations

import functools

import torch
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


def _attention(spec: dict, dtype=None, base=None) -> nn.Module:
    if base is None:
        raise ValueError("lrc checkpoint: an attention module is built from the base model's attention module")
    return LrcAttention(base, spec, dtype=dtype)


# builder(spec, dtype=None, base=None): ``base`` is the module being replaced
MODULE_TYPES = {"lowrank": _lowrank, "dense": _dense, "compensated": _compensated, "attention": _attention}


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


def apply_structure(model: nn.Module, modules: dict) -> None:
    """Replace every module named in ``modules`` by an empty module of the described type, in place, in the dtype of
    the module it replaces. Parents go before their children (an attention module before its ``q_proj``)."""
    for name in sorted(modules, key=lambda n: n.count(".")):
        base = model.get_submodule(name)
        model.set_submodule(name, build_module(modules[name], dtype=_float_dtype(base), base=base))


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
                                   if name.startswith(self._lrc_prefix)})

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
