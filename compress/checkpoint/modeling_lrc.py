"""Self-contained loader for lrc checkpoints (imports only torch and transformers).

lrc copies this file into every compressed checkpoint, with the files it imports relatively: ``lrc_types.py``, the
checkpoint's module types (spec type -> builder), written at save time; ``lrc_layers.py``, the core types (``lowrank``,
``dense``); ``lrc_fast.py``, the execution fast path; and the file of each other module type the checkpoint uses (a
method's own, e.g. EoRA's ``compensated``). Inside lrc, ``lrc_types.py`` is the registry of every module type
(``module_types.py``). transformers' remote-code loader copies relative imports along with the file.
``config.json`` has ``model_type: "lrc"``, so plain transformers refuses the checkpoint unless
``trust_remote_code=True`` lets it run this file (with the base model type it would build a dense model, re-initialise
every factorised weight and return garbage). ``auto_map`` names:

- ``AutoConfig`` -> ``LrcConfig``: the base model's config (a subclass of e.g. ``LlamaConfig``) with model type lrc;
- ``AutoModelForCausalLM`` -> ``LrcForCausalLM``: the base causal LM with the compressed modules swapped in;
- ``AutoModel`` -> ``LrcModel``: the same for the bare decoder (e.g. ``LlamaModel``), which is what transformers'
  remote-code path of serving stacks builds (vLLM's Transformers backend).

It is architecture-generic: the ``lrc`` section names the base (``base_model_type``, ``base_architecture``) and
describes every replaced module as data (``modules[name] = {type, ...}``); the loader subclasses the base transformers
classes, swaps those modules in (``apply_structure``: each spec built by its type's builder, ``MODULE_TYPES``), lets
transformers load the safetensors weights, and sets up the execution fast path (``set_fast_path``).

Format versions (``lrc.format_version``): 1 kept the base ``model_type`` in config.json; 2 is ``model_type: "lrc"``
with ``lrc.base_model_type``. Format 1 is migrated in memory (``upgrade_section``); a newer format is refused.
"""
from __future__ import annotations

import functools

from torch import nn

from .lrc_fast import FAST_PATH, FUSE
from .lrc_layers import LowRankLinear, _float_dtype
from .lrc_types import MODULE_TYPES

__all__ = ["AUTO_MAP", "LRC_FORMAT_VERSION", "LowRankLinear", "MODULE_TYPES", "apply_structure", "build_module",
           "link_shared", "set_fast_path"]

LRC_FORMAT_VERSION = 2
AUTO_MAP = {"AutoConfig": "modeling_lrc.LrcConfig", "AutoModel": "modeling_lrc.LrcModel",
            "AutoModelForCausalLM": "modeling_lrc.LrcForCausalLM"}
# from_pretrained arguments that locate config.json (the rest are for the model)
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def build_module(spec: dict, dtype=None, base: nn.Module | None = None) -> nn.Module:
    """An empty module of the structure ``spec`` describes (weights are loaded afterwards), replacing ``base``:
    ``MODULE_TYPES[spec["type"]](spec, dtype=dtype, base=base, build=build_module)`` (``build`` builds a spec nested
    in this one)."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in MODULE_TYPES:
        raise ValueError(f"lrc checkpoint: unknown module type {kind!r}; this loader knows {sorted(MODULE_TYPES)}")
    try:
        return MODULE_TYPES[kind](spec, dtype=dtype, base=base, build=build_module)
    except KeyError as e:  # a known type whose spec lacks a field its builder reads
        raise ValueError(f"lrc checkpoint: a {kind!r} module spec has no {e.args[0]!r} field: {spec}") from None


def apply_structure(model: nn.Module, modules: dict, prefix: str = "") -> None:
    """Replace every module named in ``modules`` by an empty module of the described type, in place, in the dtype of
    the module it replaces. Parents go before their children (an attention module before its ``q_proj``). Then let
    the new modules find the modules they refer to by name (``link_shared``; ``prefix`` as there)."""
    for name in sorted(modules, key=lambda n: n.count(".")):
        base = model.get_submodule(name)
        model.set_submodule(name, build_module(modules[name], dtype=_float_dtype(base), base=base))
    link_shared(model, modules, prefix)


def link_shared(model: nn.Module, modules: dict, prefix: str = "") -> None:
    """Call ``lrc_link(find)`` on every module (and module inside it) named in ``modules`` that has the hook (e.g. a
    dictionary shared across layers links to its owner): ``find(name)`` is the module of ``model`` with that full
    name of ``lrc.modules``, or None. Names lose ``prefix`` where they start with it (the ``lrc.modules`` names of a
    bare decoder start with ``model.``)."""

    def find(name: str) -> nn.Module | None:
        try:
            return model.get_submodule(name[len(prefix):] if prefix and name.startswith(prefix) else name)
        except AttributeError:
            return None

    for name in modules:
        for module in model.get_submodule(name).modules():
            link = getattr(module, "lrc_link", None)
            if link is not None:
                link(find)


def set_fast_path(model: nn.Module, fast: bool = True, fuse: bool = True, layout: bool = True) -> nn.Module:
    """Switch the execution fast path (``lrc_fast.py``) of every lrc module in ``model`` (each module's
    ``lrc_fast_path`` hook); outputs are the same up to float round-off either way. ``fast``: factors applied directly
    instead of module calls; ``fuse`` (with ``fast``): one GEMM for the modules that receive the same input tensor;
    ``layout``: low-rank factors with more outputs than inputs stored column-major (the same values:
    ``lrc_fast.prefer_layout``). ``from_pretrained`` applies the defaults (``LRC_FAST_PATH``, ``LRC_FUSE``)."""
    for m in model.modules():
        hook = getattr(m, "lrc_fast_path", None)
        if hook is not None:
            hook(fast, fuse, layout)
    return model


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
            if cls._lrc_base is not None:  # the weights are loaded: lay out the factors for the kernels
                loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
                set_fast_path(loaded[0] if isinstance(loaded, tuple) else loaded, FAST_PATH, FUSE, FAST_PATH)
                return loaded
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
