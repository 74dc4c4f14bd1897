"""Statistics of the loss gradient (methods.md §2b, §11), streamed one decoder block at a time.

Every statistic here needs a backward pass of the causal-LM loss (labels = inputs, shifted by transformers), one
calibration sequence at a time, so the engine computes them on the dense model before the block loop
(``engine/spectra.py``) and a method asks for them by name in ``Method.needs`` like any forward statistic:

- ``fisher`` (FWSVD): the empirical Fisher ``I_ij = Σ_d (∂L_d/∂W_ij)²`` of each targeted weight, reduced at once to
  ``fisher_out[i] = Σ_j I_ij`` (per output row) and ``fisher_in[j] = Σ_i I_ij`` (per input feature). Each weight's
  gradient is reduced in a hook the moment it is accumulated and then dropped.
- ``output_grad_gram`` (KFAC-SVD): ``G = Σ_t g_t g_tᵀ`` (m x m) over the tokens of every sequence, ``g_t = ∂L/∂y_t``
  the gradient at the Linear's output, as the LEMS reference collects it: the first and last ⌊0.125·T⌋ tokens of each
  sequence are dropped, and each token's gradient norm is clamped to [0.1 μ, 10 μ], μ the sequence's mean token norm
  (tokens with a norm below 1e-10 are left as they are). Sums in float64; the scale of G does not matter.

A statistic is a ``GradientStat`` registered with ``@register_gradient_stat``; ``fisher_sums`` is the definition of
the Fisher sums run on the whole model (a reference for the tests), ``gradient_stats_streamed`` the engine's pass:
the same sums with one block on the device at a time.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import ClassVar

import torch
from torch import nn

from .capture import capture_block_inputs, move_outside_blocks
from .stats import MODEL_STATS
from .stream import head_loss, hidden

GRADIENT_STATS: dict[str, type["GradientStat"]] = {}


def register_gradient_stat(cls: type["GradientStat"]) -> type["GradientStat"]:
    """Class decorator: a method may then name ``cls.name`` in ``needs``."""
    GRADIENT_STATS[cls.name] = cls
    MODEL_STATS.add(cls.name)
    return cls


class GradientStat:
    """One gradient statistic of some Linears of one block: ``collecting()`` is entered around the block's backward
    passes, and ``acc`` holds ``{f"{full name}.{key}": float64 tensor}`` sums."""

    name: ClassVar[str]
    needs_input_grad: ClassVar[bool] = False  # True: the block's outputs must carry gradients even with no weight grad

    def __init__(self, modules: dict[str, nn.Module], acc: dict[str, torch.Tensor]):
        """``modules``: full name -> the Linear (in the block now on the device)."""
        self.modules, self.acc = modules, acc

    def weights(self) -> set[nn.Parameter]:
        """The parameters whose gradient this statistic needs computed."""
        return set()

    @contextmanager
    def collecting(self):
        yield


@register_gradient_stat
class FisherSums(GradientStat):
    name = "fisher"

    def weights(self):
        return {m.weight for m in self.modules.values()}

    @contextmanager
    def collecting(self):
        names = {m.weight: n for n, m in self.modules.items()}
        for n, m in self.modules.items():
            self.acc.setdefault(f"{n}.fisher_out", torch.zeros(m.weight.shape[0], dtype=torch.float64))
            self.acc.setdefault(f"{n}.fisher_in", torch.zeros(m.weight.shape[1], dtype=torch.float64))

        def reduce(param):
            g2, name = param.grad.double().square(), names[param]
            self.acc[f"{name}.fisher_out"] += g2.sum(1).cpu()
            self.acc[f"{name}.fisher_in"] += g2.sum(0).cpu()
            param.grad = None

        handles = [p.register_post_accumulate_grad_hook(reduce) for p in names]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def clamped_token_grads(g: torch.Tensor, edge: float = 0.125, low: float = 0.1, high: float = 10.0) -> torch.Tensor:
    """One sequence's output gradients ``g`` (T x m) as the LEMS reference weighs them for G: the middle tokens only
    (``⌊edge·T⌋`` dropped at each end), each token's norm clamped to ``[low·μ, high·μ]`` (μ: their mean norm),
    tokens with a norm below 1e-10 unchanged."""
    cut = int(edge * g.shape[0])
    g = g[cut: g.shape[0] - cut] if g.shape[0] - 2 * cut > 0 else g
    norms = g.norm(dim=1)
    mu = norms.mean()
    scale = torch.where(norms < 1e-10, torch.ones_like(norms),
                        norms.clamp(low * mu, high * mu) / norms.clamp_min(1e-10))
    return g * scale[:, None]


@register_gradient_stat
class OutputGradGram(GradientStat):
    name = "output_grad_gram"
    needs_input_grad = True

    @contextmanager
    def collecting(self):
        for n, m in self.modules.items():
            self.acc.setdefault(f"{n}.output_grad_gram",
                                torch.zeros(m.weight.shape[0], m.weight.shape[0], dtype=torch.float64))

        def forward_hook(name):
            def hook(module, args, output):
                if output.requires_grad:
                    output.register_hook(lambda g: self._add(name, g))
            return hook

        handles = [m.register_forward_hook(forward_hook(n)) for n, m in self.modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _add(self, name: str, grad: torch.Tensor) -> None:
        for seq in grad.reshape(-1, grad.shape[-2], grad.shape[-1]):  # one sequence at a time (batch 1 here)
            g = clamped_token_grads(seq.double())
            self.acc[f"{name}.output_grad_gram"] += (g.T @ g).cpu()


@contextmanager
def _only_grads(params, wanted: set) -> None:
    """Within the block only ``wanted`` of ``params`` require grad; flags restored and gradients cleared on exit."""
    flags = {p: p.requires_grad for p in params}
    try:
        for p in flags:
            p.requires_grad_(p in wanted)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


@contextmanager
def collecting(stats: list[GradientStat], params):
    """Every statistic of ``stats`` collecting, with exactly the parameters they need requiring grad."""
    with _only_grads(params, set().union(*(s.weights() for s in stats))), ExitStack() as stack:
        for s in stats:
            stack.enter_context(s.collecting())
        yield


def fisher_sums(model: nn.Module, ids: torch.Tensor, names: list[str], device: torch.device,
                batch_size: int = 1, checkpointing: bool = False, progress=None) -> dict[str, torch.Tensor]:
    """``{f"{name}.fisher_out": (m,), f"{name}.fisher_in": (n,)}`` in float64 for every Linear in ``names``, on the
    whole model (the definition; the engine runs ``gradient_stats_streamed``).

    ``batch_size`` sequences share one gradient (1 = the per-sequence empirical Fisher of the definition).
    """
    modules = dict(model.named_modules())
    acc: dict[str, torch.Tensor] = {}
    stat = FisherSums({n: modules[n] for n in names}, acc)
    was_training = model.training
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    had_ckpt = bool(getattr(model, flag, False))
    home = next(model.parameters()).device
    try:
        with collecting([stat], list(model.parameters())):
            model.to(device)
            model.eval()  # no dropout: the Fisher of the deployed model
            if checkpointing:
                (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
                model.train()  # transformers only checkpoints in training mode; these models have no dropout at p>0
            for s in range(0, ids.shape[0], batch_size):
                x = ids[s : s + batch_size].to(device)
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                loss.backward()
                if progress is not None:
                    progress.phase(f"fisher {min(s + batch_size, ids.shape[0])}/{ids.shape[0]}")
    finally:
        if checkpointing and not had_ckpt:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.train(was_training)
        model.to(home)
    return acc


def gradient_stats_streamed(model: nn.Module, prefix: str, blocks: nn.ModuleList, ids: torch.Tensor,
                            wants: dict[str, list[str]], host, cache, batch_size: int = 8, progress=None,
                            on_block=None) -> dict[str, torch.Tensor]:
    """The statistics ``wants`` (statistic name -> full module names) with one block on ``host.device`` at a time
    (``stream.Host``), from per-sequence gradients, exactly.

    Block-major, as the compression loop runs: a forward pass stores every block's inputs for all sequences (the run
    cache's memory-mapped ``fisher_<j>.bin``, removed as the backward pass leaves them), the head gives each
    sequence's gradient at the last block's output, then blocks are visited from the last to the first, each loaded
    once: every sequence's block forward is recomputed from its stored input with autograd and back-propagated with
    that sequence's output gradient; the statistics are reduced in hooks as the gradients appear, and the input
    gradient goes on to the block below. Memory: one block, the head, one sequence's activations with autograd, two
    ``sequences x tokens x hidden`` tensors, and one block's statistics: with ``on_block(j, sums)`` each block's
    sums are handed over once its backward is done (and not returned); without it all are returned.
    """
    device, n_seq, L = host.device, ids.shape[0], len(blocks)
    dtype = model.get_input_embeddings().weight.dtype
    shape = (n_seq, ids.shape[1], model.config.hidden_size)
    out: dict[str, torch.Tensor] = {}

    def store(j: int, create: bool = False) -> torch.Tensor:
        return cache.acts(j, shape, dtype, create=create, stream="fisher")

    x = store(0, create=True)
    kwargs = capture_block_inputs(model, blocks, ids, x, batch_size, device).to(device)
    as_tuple = False
    with torch.no_grad():  # forward: every block's inputs
        for j in range(L):
            block, y = host.load(j), store(j + 1, create=True)
            for s in range(0, n_seq, batch_size):
                o, as_tuple = hidden(block(x[s:s + batch_size].to(device), **kwargs[j]))
                y[s:s + batch_size] = o.to("cpu", dtype)
            host.unload(j)
            x = y
            if progress is not None:
                progress.phase(f"gradients forward {j + 1}/{L}")
    grad = cache.acts(0, shape, dtype, create=True, stream="fisher_grad")  # d loss_d / d (block output), per sequence d
    move_outside_blocks(model, blocks, device)
    try:
        for d in range(n_seq):
            h = x[d:d + 1].to(device, copy=True).requires_grad_(True)
            head_loss(model, prefix, as_tuple, h, ids[d:d + 1]).backward()
            grad[d:d + 1] = h.grad.to("cpu", dtype)
    finally:
        move_outside_blocks(model, blocks, "cpu")
    for j in reversed(range(L)):  # backward, block by block: per-sequence gradients, exactly
        block, mine = host.load(j), f"{prefix}.{j}."
        modules = dict(block.named_modules())
        acc: dict[str, torch.Tensor] = {}
        stats = [GRADIENT_STATS[k]({n: modules[n.removeprefix(mine)] for n in names if n.startswith(mine)}, acc)
                 for k, names in wants.items()]
        stats = [s for s in stats if s.modules]
        input_grad = any(s.needs_input_grad for s in stats)
        x_j = store(j)
        with collecting(stats, list(block.parameters())), torch.enable_grad():
            for d in range(n_seq if stats or j > 0 else 0):
                inp = x_j[d:d + 1].to(device, copy=True).requires_grad_(j > 0 or input_grad)
                o, _ = hidden(block(inp, **kwargs[j]))
                if o.requires_grad:
                    o.backward(grad[d:d + 1].to(device, o.dtype))
                if j > 0:
                    grad[d:d + 1] = inp.grad.to("cpu", dtype)
        host.unload(j)
        cache.acts_path(j + 1, "fisher").unlink(missing_ok=True)
        if on_block is not None:
            on_block(j, acc)
        else:
            out.update(acc)
        if progress is not None:
            progress.phase(f"gradients backward {L - j}/{L}")
    del x, grad, x_j
    for path in (cache.acts_path(0, "fisher"), cache.acts_path(0, "fisher_grad")):
        path.unlink(missing_ok=True)
    return out


def fisher_sums_streamed(model, prefix, blocks, ids, names, host, cache, batch_size: int = 8,
                         progress=None) -> dict[str, torch.Tensor]:
    """``fisher_sums`` (per-sequence gradients) with one block on ``host.device`` at a time."""
    return gradient_stats_streamed(model, prefix, blocks, ids, {"fisher": names}, host, cache, batch_size, progress)
