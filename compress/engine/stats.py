"""Statistics collectors attached to a block's Linears with forward hooks, and discovery of a block's structure.

A collector has a ``name`` (what methods list in ``needs``), attaches to a set of modules, and exposes
``result(module_name)``. Linears that receive the very same input tensor (q/k/v, gate/up) form a group and share one
statistic. New collectors (output Grams for LoRD, |x| means for ASVD, ...) register in ``COLLECTORS``.
"""
from __future__ import annotations

import torch
from torch import nn

from .capture import StopForward


@torch.no_grad()
def discover_groups(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Linears of ``block`` grouped by shared input tensor, groups in call order (q,k,v → o → gate,up → down)."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [mod.register_forward_pre_hook(lambda m, a, n=name: calls.append((n, a[0])))
               for name, mod in block.named_modules() if isinstance(mod, nn.Linear)]
    try:
        block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in calls:  # ``calls`` holds every input alive, so identity comparison is safe
        for tensor, members in groups:
            if tensor is x:
                if name not in members:
                    members.append(name)
                break
        else:
            groups.append((x, [name]))
    return [members for _, members in groups]


class InputGram:
    """``H = Σ xᵀx`` over all calibration tokens of each group's shared input: fp32 per batch, summed in fp64."""

    name = "input_gram"

    def __init__(self, modules: dict[str, nn.Module], owner: dict[str, str]):
        self.owner = owner
        self.acc: dict[str, torch.Tensor] = {}
        self.handles = [modules[o].register_forward_pre_hook(self._hook(o)) for o in sorted(set(owner.values()))]

    def _hook(self, key: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            g = (x.T @ x).double()
            if key in self.acc:
                self.acc[key] += g
            else:
                self.acc[key] = g
        return hook

    def result(self, name: str) -> torch.Tensor:
        return self.acc[self.owner[name]]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


COLLECTORS = {InputGram.name: InputGram}


def attach(needs: set[str], modules: dict[str, nn.Module], owner: dict[str, str]) -> list:
    return [COLLECTORS[n](modules, owner) for n in sorted(needs)]


def stop_after(module: nn.Module):
    """A forward hook that ends the block's forward once ``module`` has run (its statistics are complete)."""
    def hook(m, args, output):
        raise StopForward
    return module.register_forward_hook(hook)
