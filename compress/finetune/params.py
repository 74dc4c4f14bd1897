"""Which parameters ``lrc finetune`` trains. Everything else is frozen (``requires_grad=False``): it gets no
gradient and no optimizer state, so the optimizer's memory covers the trained parameters only."""
from __future__ import annotations

from torch import nn

from ..checkpoint.modeling_lrc import CompensatedLinear, DictLinear, LowRankLinear, LrcAttention
from ..errors import LrcError

REPLACEMENTS = (LowRankLinear, DictLinear, CompensatedLinear, LrcAttention)


def _owned(model: nn.Module, kinds) -> dict[str, nn.Parameter]:
    """Parameters inside modules of ``kinds``, by name; a shared tensor (a dictionary, tied weights) once."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            for pname, p in module.named_parameters(prefix=name):
                if id(p) not in seen:
                    seen.add(id(p))
                    out[pname] = p
    return out


def select(model: nn.Module, train: str) -> dict[str, nn.Parameter]:
    """The parameters ``train`` names (``lrc``, ``residual``, ``all``), by name. ``lrc``: every parameter of lrc's
    replacement modules (factorised, dictionary, compensated and MoDeGPT attention modules: WeLore's LRC-only
    fine-tuning), the dense ones frozen. ``residual``: only the EoRA paths (``lora_A``, ``lora_B``)."""
    if train == "all":
        params = {n: p for n, p in model.named_parameters()}
    elif train == "lrc":
        params = _owned(model, REPLACEMENTS)
    elif train == "residual":
        params = {n: p for n, p in _owned(model, (CompensatedLinear,)).items()
                  if ".lora_A." in n or ".lora_B." in n}
    else:
        raise LrcError(f"finetune.train: {train!r}; use lrc, residual or all")
    if not params:
        raise LrcError(f"finetune.train: {train}: the model has no such parameters "
                       f"({'not an lrc checkpoint with compressed modules' if train == 'lrc' else 'no EoRA residuals'})")
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
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            u |= {id(p) for p in module.second.parameters()}
            v |= {id(p) for p in module.first.parameters()}
    if not u:
        raise LrcError("finetune.factors: sequential needs low-rank modules among the trained parameters")
    return ({n: p for n, p in trained.items() if id(p) not in v}, {n: p for n, p in trained.items() if id(p) not in u})
