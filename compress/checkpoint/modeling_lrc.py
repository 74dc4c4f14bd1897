"""Self-contained loader for lrc checkpoints (imports only torch and transformers).

lrc copies this file into every compressed checkpoint and points ``config.json``'s ``auto_map`` at
``LrcForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works on a machine
without lrc. It is architecture-generic: the checkpoint's ``config.json`` names the base transformers class
(``lrc.base_architecture``) and describes every replaced module as data (``lrc.modules[name] = {type, ...}``); the
loader builds the base model, swaps those modules in, and lets transformers load the safetensors weights.

Module types (add new ones to ``MODULE_TYPES``):
- ``lowrank``: ``LowRankLinear`` with ``in_features``, ``out_features``, ``rank``, ``bias``.
- ``dense``: a plain ``nn.Linear`` with possibly new ``in_features``/``out_features`` (resized matrices).
- ``compensated``: ``CompensatedLinear``, any of the above (``base``) plus a residual path of ``rank`` (EoRA).
"""
from __future__ import annotations

import torch
from torch import nn

LRC_FORMAT_VERSION = 1


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


def _lowrank(spec: dict, dtype=None) -> nn.Module:
    return LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], spec.get("bias", False), dtype=dtype)


def _dense(spec: dict, dtype=None) -> nn.Module:
    return nn.Linear(spec["in_features"], spec["out_features"], bias=spec.get("bias", False), dtype=dtype)


def _compensated(spec: dict, dtype=None) -> nn.Module:
    return CompensatedLinear(build_module(spec["base"], dtype=dtype), spec["rank"], dtype=dtype)


MODULE_TYPES = {"lowrank": _lowrank, "dense": _dense, "compensated": _compensated}


def build_module(spec: dict, dtype=None) -> nn.Module:
    """An empty module of the structure ``spec`` describes (weights are loaded afterwards)."""
    try:
        return MODULE_TYPES[spec["type"]](spec, dtype=dtype)
    except KeyError as e:
        raise ValueError(f"lrc checkpoint: unknown module type {spec.get('type')!r}; this loader knows "
                         f"{sorted(MODULE_TYPES)}") from e


def apply_structure(model: nn.Module, modules: dict) -> None:
    """Replace every module named in ``modules`` by an empty module of the described type, in place."""
    for name, spec in modules.items():
        old = model.get_submodule(name)
        dtype = old.weight.dtype if hasattr(old, "weight") else None
        model.set_submodule(name, build_module(spec, dtype=dtype))


def _lrc_section(config) -> dict:
    section = getattr(config, "lrc", None)
    if not isinstance(section, dict) or "modules" not in section:
        raise ValueError("not an lrc checkpoint: config.json has no 'lrc' section with 'modules'")
    return section


def compressed_class(base: type) -> type:
    """A subclass of the transformers class ``base`` whose constructor swaps in the modules listed in the config."""

    class Compressed(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            apply_structure(self, _lrc_section(config)["modules"])

    Compressed.__name__ = Compressed.__qualname__ = base.__name__
    return Compressed


class LrcForCausalLM:
    """Entry point named in ``auto_map``: resolves the base architecture and loads the compressed model."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        import transformers

        if config is None:
            config = transformers.AutoConfig.from_pretrained(pretrained_model_name_or_path)
        section = _lrc_section(config)
        arch = section.get("base_architecture") or (config.architectures or [None])[0]
        base = getattr(transformers, arch, None)
        if base is None:
            raise ValueError(f"lrc checkpoint: transformers {transformers.__version__} has no class {arch!r}")
        kwargs.pop("trust_remote_code", None)
        kwargs.pop("adapter_kwargs", None)
        return compressed_class(base).from_pretrained(pretrained_model_name_or_path, *model_args, config=config,
                                                      **kwargs)
