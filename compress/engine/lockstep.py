"""The sequential scheme in one forward per calibration batch.

Sequential compression (q,k,v → o → gate,up → down) needs each group's statistics from the block as compressed so
far. Run naively, every group costs a partial forward from the block's input, and the outputs one more: for a
Llama block about 2.4 forwards instead of one. Here every batch's forward runs once, in a thread of its own, and
waits when it is about to call the next group's first module: by then that module's input statistics (pre-hooks) are
complete for the batch. When every batch waits there, the group is decomposed and its modules replaced, and the
forwards go on — through the new modules — to the next group, and at last to the block's outputs.

Only one forward runs at a time, in batch order, so statistics accumulate in the same order as in the prefix
passes and the result is bit-identical to them (tests/test_lockstep.py). The targeted Linears are wrapped in
``Slot``s for the duration, so the call a forward waits in goes to whatever module the slot holds when it resumes.
The activations of all batches stay alive while they wait (the calibration set's activations at the widest point
of the block, on the device); ``LRC_PREFIX_PASSES=1`` selects the prefix passes instead.
"""
from __future__ import annotations

import os
import threading

import torch
from torch import nn

from ..methods import METHODS
from ..plan import expert_counts
from .decompose import replace_group
from .job import BlockJob
from .shared import is_shared
from .stats import attach


class _Abort(BaseException):
    """Unwinds a waiting forward when the block's compression fails."""


def enabled() -> bool:
    return os.environ.get("LRC_PREFIX_PASSES", "") in ("", "0")


class Slot(nn.Module):
    """Holds a Linear-like module; a forward waits here (``Lockstep.arrive``) before calling what it holds."""

    def __init__(self, inner: nn.Module, name: str, lockstep: Lockstep):
        super().__init__()
        self.inner = inner
        self.__dict__["_where"] = (name, lockstep)  # not a submodule

    def forward(self, *args, **kwargs):
        name, lockstep = self.__dict__["_where"]
        lockstep.arrive(name)
        return self.inner(*args, **kwargs)

    def __getattr__(self, attr):  # ``weight``, ``in_features``... of the module held, for code that reads them
        try:
            return super().__getattr__(attr)
        except AttributeError:
            return getattr(self._modules["inner"], attr)


class Lockstep:
    """Every batch of ``x_in`` through ``block`` once, each waiting at ``advance``'s gate; outputs into ``out``."""

    def __init__(self, block: nn.Module, names: list[str], x_in, kwargs, batch_size: int, device, out):
        self.block, self.kwargs, self.device, self.x_in, self.out = block, kwargs, device, x_in, out
        self.slices = [slice(s, s + batch_size) for s in range(0, x_in.shape[0], batch_size)]
        self.slots = {n: Slot(block.get_submodule(n), n, self) for n in names}
        for n, s in self.slots.items():
            block.set_submodule(n, s)
        self.cv = threading.Condition()
        self.local = threading.local()
        self.gate: str | None = None
        self.turn: int | None = None
        self.status: dict[int, str] = {}
        self.threads: dict[int, threading.Thread] = {}
        self.error: BaseException | None = None
        self.abort = False

    def arrive(self, name: str) -> None:
        """In a forward's thread: wait here if ``name`` is the gate, until ``advance`` gives this batch its turn."""
        if name != self.gate:
            return
        b = self.local.batch
        with self.cv:
            self.status[b], self.turn = "waiting", None
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.turn == b or self.abort)
            if self.abort:
                raise _Abort

    def _run(self, b: int) -> None:
        self.local.batch = b
        status = "done"
        try:
            with torch.no_grad():
                y = self.block(self.x_in[self.slices[b]].to(self.device), **self.kwargs)
            y = y[0] if isinstance(y, (tuple, list)) else y
            self.out[self.slices[b]] = y.to("cpu", self.out.dtype)
        except _Abort:
            status = "aborted"
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
            self.error, status = err, "error"
        finally:
            with self.cv:
                self.status[b], self.turn = status, None
                self.cv.notify_all()

    def advance(self, gate: str | None) -> None:
        """Let every batch run, one after the other, until it is about to call slot ``gate`` (None: to the end)."""
        self.gate = gate
        for b in range(len(self.slices)):
            with self.cv:
                if self.status.get(b) == "done":
                    raise RuntimeError(f"{gate}: a forward ended without calling it (not every module runs for "
                                       "every token; use LRC_PREFIX_PASSES=1)")
                self.status[b], self.turn = "running", b
                if b not in self.threads:
                    self.threads[b] = threading.Thread(target=self._run, args=(b,), daemon=True)
                    self.threads[b].start()
                self.cv.notify_all()
                self.cv.wait_for(lambda: self.status[b] != "running")
            if self.status[b] == "error":
                raise self.error
            if gate is not None and self.status[b] != "waiting":
                raise RuntimeError(f"{gate}: a forward ended without calling it (use LRC_PREFIX_PASSES=1)")

    def put(self, name: str, module: nn.Module) -> None:
        """Replace the module slot ``name`` holds (forwards waiting there will call this one)."""
        self.slots[name].inner = module

    def held(self, name: str) -> nn.Module:
        return self.slots[name].inner

    def close(self) -> None:
        """Unwind forwards still waiting (after an error) and put the held modules back in place of the slots."""
        with self.cv:
            self.abort = True
            self.cv.notify_all()
        for t in self.threads.values():
            t.join()
        for n, s in self.slots.items():
            self.block.set_submodule(n, s.inner)


def lockstep_applies(job: BlockJob) -> bool:
    """The common case: one Linear stage, sequential, compressed propagation, the layer objective, one calibration
    stream, no shared dictionaries, and no experts (each targeted module runs once in every forward)."""
    eng, recipe = job.eng, job.recipe
    return (enabled() and eng.sequential and eng.propagate == "compressed" and eng.objective == "layer"
            and len(job.streams) == 1 and len(recipe.stages) == 1 and METHODS[recipe.stages[0].method].unit != "block"
            and not expert_counts(job.config) and not any(is_shared(r) for r in job.rows))


def compress_lockstep(job: BlockJob, groups: list[list[str]]) -> None:
    """``pipeline.compress_block`` for ``lockstep_applies``: the groups in call order, their statistics from the
    forwards waiting at each group's first module, the outputs from the same forwards run to the end."""
    eng, stage, prefix, stream = job.eng, job.recipe.stages[0], job.prefix, job.main
    rel = {r.name.removeprefix(prefix): r for r in job.rows if r.stage == 0}
    owner = {n: g[0] for g in groups for n in g}
    targeted = [g for g in ([n for n in g if n in rel] for g in groups) if g]
    names = sorted({n for g in targeted for n in g} | {owner[n] for g in targeted for n in g})
    method = METHODS[stage.method](job.recipe.method_config(0))
    steps = Lockstep(job.block, names, stream.x_in, stream.dev_kwargs[job.index], eng.batch_size, job.device,
                     job.outs[stream.name])
    try:
        for group in targeted:
            job.progress.phase(f"statistics {','.join(n.rsplit('.', 1)[-1] for n in group)}")
            own = {n: owner[n] for n in group}
            collectors = attach(set(method.needs) | {"input_gram"}, dict(job.block.named_modules()), own)
            try:
                steps.advance(own[group[-1]])
            finally:
                for c in collectors:
                    c.remove()
            job.progress.phase(f"decompose {len(group)} module(s)")
            replace_group(job, group, rel, collectors, method, stage, steps.held, steps.put)
        job.progress.phase("propagate")
        steps.advance(None)
    finally:
        steps.close()
