"""Which parameters ``lrc finetune`` trains. Everything else is frozen (``requires_grad=False``): it gets no
gradient and no optimizer state, so the optimizer's memory covers the trained parameters only.

``train: lrc`` trains what lrc wrote, as the model's own record says: the modules named in its ``config.lrc``
``modules`` (the specs a checkpoint is rebuilt from: ``lowrank``, ``dictionary``, ``compensated``, MoDeGPT's
``attention`` and the ``dense`` Linears a method resized), not a list of classes, so a plain ``nn.Linear`` that MoDeGPT
shrank trains and any module a method rebuilds is covered without naming it here (issue 22)."""
from __future__ import annotations

from torch import nn

from ..checkpoint.module_types import factor_pair, residual_paths
from ..errors import LrcError


def _params_of(model: nn.Module, keep) -> dict[str, nn.Parameter]:
    """Parameters inside the modules ``keep(name, module)`` accepts, by name, in ``named_modules`` order; a shared
    tensor (a dictionary, tied weights) once."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if keep(name, module):
            for pname, p in module.named_parameters(prefix=name):
                if id(p) not in seen:
                    seen.add(id(p))
                    out[pname] = p
    return out


def built_modules(model: nn.Module) -> set[str]:
    """Names of the modules lrc built, replaced or resized in ``model``: the keys of ``config.lrc["modules"]`` (empty
    for a model lrc did not compress)."""
    section = getattr(getattr(model, "config", None), "lrc", None)
    return set(section.get("modules") or {}) if isinstance(section, dict) else set()


def select(model: nn.Module, train: str) -> dict[str, nn.Parameter]:
    """The parameters ``train`` names (``lrc``, ``residual``, ``all``), by name. ``lrc``: every parameter of the
    modules lrc built (``built_modules``: factorised, dictionary, compensated, MoDeGPT attention modules and resized
    dense Linears; WeLore's LRC-only fine-tuning), the modules lrc left untouched frozen. ``residual``: only the EoRA
    paths (``lora_A``, ``lora_B``: ``ModuleType.residual``)."""
    if train == "all":
        params = {n: p for n, p in model.named_parameters()}
    elif train == "lrc":
        built = built_modules(model)
        params = _params_of(model, lambda name, _: name in built)
    elif train == "residual":  # the residual submodules of the modules whose type has them
        subs = {sub for m in model.modules() for sub in residual_paths(m)}
        params = {n: p for n, p in _params_of(model, lambda _, m: bool(residual_paths(m))).items()
                  if any(f".{sub}." in n for sub in subs)}
    else:
        raise LrcError(f"finetune.train: {train!r}; use lrc, residual or all")
    if not params:
        why = "not an lrc checkpoint with compressed modules" if train == "lrc" else "no EoRA residuals"
        raise LrcError(f"finetune.train: {train}: the model has no such parameters ({why})")
    return params


def freeze_all_but(model: nn.Module, trained: dict[str, nn.Parameter]) -> None:
    keep = {id(p) for p in trained.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def factor_phases(model: nn.Module, trained: dict[str, nn.Parameter]) -> tuple[dict, dict]:
    """SVD-LLM's sequential update (methods.md §3b): ``(first phase, second phase)`` subsets of ``trained``. The
    first holds the low-rank modules' output factors U (``second``), the second their input factors V (``first``);
    every other trained parameter is in both."""
    u, v = set(), set()
    for module in model.modules():
        factors = factor_pair(module)  # (output, input) factor of a low-rank module (``ModuleType.factors``)
        if factors is not None:
            u |= {id(p) for p in factors[0].parameters()}
            v |= {id(p) for p in factors[1].parameters()}
    if not u:
        raise LrcError("finetune.factors: sequential needs low-rank modules among the trained parameters")
    return ({n: p for n, p in trained.items() if id(p) not in v}, {n: p for n, p in trained.items() if id(p) not in u})
