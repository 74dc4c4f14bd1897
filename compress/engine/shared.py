"""Modules fitted jointly across blocks (``Method.shared_group``: one fit for the same projection of several
layers): the one place the block loop waits for later blocks. The engine keeps the waiting and the run-cache
bookkeeping; the method does the fit (``Method.fit_group``).

A row whose ``shared_group`` is not None belongs to the group of the rows of its stage with the same key. While the
group is incomplete, each member's input Gram, weight and bias go to the run cache (``shared-<name>.safetensors``)
and the module stays dense, so that layer's outputs propagate from the dense weight (as ``propagate: original``
would for it). When the group's last block is done, the method fits the group, every member is replaced (a member
left out by ``targets``/``ignore`` is no member: the plan sizes the group from the present ones), the finished blocks
of the group are saved again, and the stashed statistics are removed once the current block is saved. Nothing but
the group's statistics waits: the dense model is not held. A crash at any point resumes: a member's statistics stay
on disk until its group's last block is saved, refitting is deterministic (the method's, seeded), and an earlier
block saved again before the crash (already holding its new module) is refitted like one still dense. Not yet
covered: a crash inside that second save, between the block's new weights and its new record
(``RunCache.save_block`` writes them one after the other). The fit runs on the engine's device (``engine.device``).
"""
from __future__ import annotations

import time

import torch

from ..checkpoint.module_types import module_spec
from ..errors import LrcError
from ..linalg import weighted_error
from ..methods import METHODS
from .decompose import built_row, effective_weight
from .device import resolve_device


def _group(row):
    """The key of ``row``'s shared group within its stage (``Method.shared_group``), or None."""
    method = METHODS.get(getattr(row, "method", None))
    return None if method is None else method.shared_group(row)


def is_shared(row) -> bool:
    """Whether ``row``'s module waits for its group (fitted when the group's last block is reached)."""
    return _group(row) is not None


def _dtype_device(module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the module a new member replaces: the dense Linear stashed, or (a resume after a
    crash between the group's saves) the module its block was saved with (its first floating-point parameter)."""
    p = next(p for p in module.parameters() if p.is_floating_point())
    return p.dtype, p.device


class SharedGroups:
    def __init__(self, plan: list, recipe, cache, device: torch.device | str | None = None):
        """``device``: where the groups are fitted (default: the recipe's ``engine.device``, resolved)."""
        self.recipe, self.cache, self._device = recipe, cache, device
        self.groups: dict[tuple, list] = {}
        for r in plan:
            key = _group(r)
            if key is not None:
                self.groups.setdefault((r.stage, *key), []).append(r)
        for rows in self.groups.values():
            rows.sort(key=lambda r: r.block)

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = resolve_device(self.recipe.engine.device)
        return torch.device(self._device)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def stash(self, row, module, gram: torch.Tensor) -> None:
        """Keep ``row``'s input Gram, weight and bias on disk until its group is complete."""
        tensors = {"gram": gram.double().cpu().contiguous(), "weight": module.weight.detach().cpu().contiguous()}
        if module.bias is not None:
            tensors["bias"] = module.bias.detach().cpu().contiguous()
        self.cache.save_tensors(f"shared-{row.name}", tensors)

    def completed_at(self, block: int) -> list[list]:
        return [rows for rows in self.groups.values() if rows[-1].block == block]

    def open_at(self, block: int) -> bool:
        """True while a group that ``block`` belongs to waits for a later block (its blocks stay in memory)."""
        return any(rows[0].block <= block < rows[-1].block for rows in self.groups.values())

    def waiting_before(self, start: int) -> set[int]:
        """Blocks before ``start`` whose group ends at or after it: a resume at ``start`` needs them in memory."""
        return {r.block for rows in self.groups.values() if rows[-1].block >= start for r in rows if r.block < start}

    @torch.no_grad()
    def finish(self, block: int, get_block, prefix: str) -> dict[int, tuple[dict, list]]:
        """Fit every group whose last block is ``block`` (``Method.fit_group``), put the new modules into the blocks
        (``get_block(i)``), and return ``{block: (module specs, report rows)}`` of every member.

        The fit (and each member's error) runs on ``self.device``; each new module then goes to the device of the
        module it replaces. A member may already hold its new module (a resume after a crash between the group's
        saves: its block was saved again before the last one was): it is replaced by the same refit."""
        out: dict[int, tuple[dict, list]] = {}
        dev = self.device
        for rows in self.completed_at(block):
            t0 = time.perf_counter()
            saved = [self.cache.load_tensors(f"shared-{r.name}") for r in rows]
            missing = [r.name for r, t in zip(rows, saved) if t is None]
            if missing:
                raise LrcError(f"{self.cache.dir}: the statistics of {missing[0]} for its shared group are "
                               "missing; the run cache cannot be resumed (rerun without --resume)")
            saved = [{k: v.to(dev) for k, v in t.items()} for t in saved]
            method = METHODS[rows[0].method](self.recipe.method_config(rows[0].stage))
            places = []  # (block, name within it, the device of the module replaced)
            dtypes = []
            for r in rows:
                target = get_block(r.block)
                rel = r.name.removeprefix(f"{prefix}.{r.block}.")
                dt, to = _dtype_device(target.get_submodule(rel))
                places.append((target, rel, to))
                dtypes.append(dt)
            # every member on the fit's device first (they may share tensors)
            fitted = method.fit_group(rows, [t["weight"] for t in saved], [t["gram"] for t in saved],
                                      [t.get("bias") for t in saved], dtypes)
            seconds = time.perf_counter() - t0
            errors = [weighted_error(t["weight"].double(), effective_weight(mod), t["gram"])
                      for t, (mod, _) in zip(saved, fitted)]
            for j, (r, (target, rel, to), (mod, fields), error) in enumerate(zip(rows, places, fitted, errors)):
                target.set_submodule(rel, mod.to(to))
                row = built_row(r, mod, error, fields, round(seconds, 4) if j == 0 else 0.0)
                specs, report = out.setdefault(r.block, ({}, []))
                specs[r.name] = module_spec(mod)
                report.append(row)
        return out

    def cleanup(self, block: int) -> None:
        """Remove the statistics of the groups completed at ``block`` (after it is saved)."""
        for rows in self.completed_at(block):
            for r in rows:
                (self.cache.dir / f"shared-{r.name}.safetensors").unlink(missing_ok=True)
