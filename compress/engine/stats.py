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
    from ..plan import linear_units

    calls: list[tuple[str, torch.Tensor]] = []
    handles = [mod.register_forward_pre_hook(lambda m, a, n=name: calls.append((n, a[0])))
               for name, mod in linear_units(block)]
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


def _merge(groups: list[list[str]], more: list[list[str]]) -> None:
    """Add ``more`` (another sample's groups) to ``groups``: members join the group of a member already known, new
    groups go last, still in their call order (an expert's gate/up before its down)."""
    for g in more:
        home = next((h for h in groups if any(n in h for n in g)), None)
        if home is None:
            groups.append(list(g))
        else:
            home.extend(n for n in g if n not in home)


@torch.no_grad()
def block_groups(block: nn.Module, x_in: torch.Tensor, kwargs: dict, device, wanted: set[str]) -> list[list[str]]:
    """``discover_groups`` that reaches every module in ``wanted`` (names relative to the block).

    One sample shows a dense block's whole structure. A mixture-of-experts block calls only the experts its tokens
    are routed to, so while some wanted module is unseen the next samples are run too, one at a time (memory as for
    one), until all are seen or the samples run out. What is never reached gets a group of its own, last: its
    statistics then see no token, and the block loop reports it instead of leaving it out silently.
    """
    from ..plan import linear_units

    groups = discover_groups(block, x_in[:1].to(device), kwargs)
    for s in range(1, x_in.shape[0]):
        if wanted <= {n for g in groups for n in g}:
            break
        _merge(groups, discover_groups(block, x_in[s : s + 1].to(device), kwargs))
    unreached = wanted - {n for g in groups for n in g}
    return groups + [[n] for n, _ in linear_units(block) if n in unreached]


class GroupCollector:
    """Base of the collectors: one pre-hook per group owner; ``add(key, x)`` sees the input as (tokens, features)."""

    name = ""

    def __init__(self, modules: dict[str, nn.Module], owner: dict[str, str]):
        self.owner = owner
        self.acc: dict[str, torch.Tensor] = {}
        self.seen: dict[str, int] = {}  # tokens per group: 0 for an expert no calibration token is routed to
        self.handles = [modules[o].register_forward_pre_hook(self._hook(o)) for o in sorted(set(owner.values()))]

    def _hook(self, key: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            self.seen[key] = self.seen.get(key, 0) + x.shape[0]
            if x.shape[0]:
                self.add(key, x.float())
        return hook

    def tokens(self, name: str) -> int:
        """How many tokens ``name``'s statistics saw (no ``result`` exists for 0)."""
        return self.seen.get(self.owner[name], 0)

    def accumulate(self, key: str, value: torch.Tensor) -> None:
        self.acc[key] = self.acc[key] + value if key in self.acc else value

    def add(self, key: str, x: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self, name: str) -> torch.Tensor:
        return self.acc[self.owner[name]]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class InputGram(GroupCollector):
    """``H = Σ xᵀx`` over all calibration tokens of each group's shared input: fp32 per batch, summed in fp64."""

    name = "input_gram"

    def add(self, key, x):
        self.accumulate(key, (x.T @ x).double())


class DenseInputs(InputGram):
    """Attached to the dense copy of the block: the dense Gram ``H = X Xᵀ`` (for the report's error against the
    dense outputs), and each group's input of the current batch, kept for ``CrossGram``."""

    name = "dense_gram"

    def __init__(self, modules, owner):
        super().__init__(modules, owner)
        self.current: dict[str, torch.Tensor] = {}

    def add(self, key, x):
        self.current[key] = x
        super().add(key, x)


class CrossGram(GroupCollector):
    """``C = Σ x x̃ᵀ`` between the dense block's inputs ``x`` and the compressed block's inputs ``x̃`` (same tokens)."""

    name = "cross_gram"

    def __init__(self, modules, owner, dense: DenseInputs):
        super().__init__(modules, owner)
        self.dense = dense

    def add(self, key, x):
        self.accumulate(key, (self.dense.current.pop(key).T @ x).double())


class InputAbsMean(GroupCollector):
    """Per input channel ``mean_t |x_tj|`` (ASVD's ``abs_mean`` activation scale), sums in fp64."""

    name = "input_abs_mean"

    def __init__(self, modules, owner):
        super().__init__(modules, owner)
        self.count: dict[str, int] = {}

    def add(self, key, x):
        self.accumulate(key, x.abs().sum(0).double())
        self.count[key] = self.count.get(key, 0) + x.shape[0]

    def result(self, name):
        key = self.owner[name]
        return self.acc[key] / self.count[key]


class InputAbsMax(GroupCollector):
    """Per input channel ``max_t |x_tj|`` (ASVD's ``abs_max`` option)."""

    name = "input_abs_max"

    def add(self, key, x):
        m = x.abs().amax(0).double()
        self.acc[key] = torch.maximum(self.acc[key], m) if key in self.acc else m


class OutputSquares(GroupCollector):
    """Per output channel ``Σ_t y_tj²`` of each module (the diagonal of the output Gram; MoDeGPT's C_Q / C_K
    diagonals), from a forward hook on the module's output, sums in fp64. Keys are module names (no sharing)."""

    name = "output_sq"

    def __init__(self, modules, owner):
        self.owner = {n: n for n in owner}
        self.acc, self.seen = {}, {}
        self.handles = [modules[n].register_forward_hook(self._out_hook(n)) for n in sorted(self.owner)]

    def _out_hook(self, key: str):
        def hook(module, args, output):
            y = output.reshape(-1, output.shape[-1])
            self.seen[key] = self.seen.get(key, 0) + y.shape[0]
            if y.shape[0]:
                self.accumulate(key, y.float().square().sum(0).double())
        return hook


COLLECTORS = {c.name: c for c in (InputGram, InputAbsMean, InputAbsMax, OutputSquares)}
MODEL_STATS: set[str] = set()  # gradient statistics, computed before the block loop (engine/gradients.py)


def attach(needs: set[str], modules: dict[str, nn.Module], owner: dict[str, str]) -> list:
    return [COLLECTORS[n](modules, owner) for n in sorted(needs - MODEL_STATS)]


def stop_before(module: nn.Module):
    """A forward pre-hook that ends the block's forward when ``module`` is called: its input statistics (pre-hooks
    registered before this one) are complete, and nothing it or later modules compute is needed."""
    def hook(m, args):
        raise StopForward
    return module.register_forward_pre_hook(hook)


def stop_after(module: nn.Module):
    """A forward hook that ends the block's forward once ``module`` has run (its statistics are complete)."""
    def hook(m, args, output):
        raise StopForward
    return module.register_forward_hook(hook)
