"""Dictionaries shared across layers (CoSpaDi §3.3, ``share: layers``): the one place the block loop waits for later
blocks.

The same projection of ``group_size`` consecutive layers gets one dictionary, fitted on the mean of their input
Grams with their whitened weights side by side; each layer keeps its own sparse coefficients. While the group is
incomplete, each member's input Gram, weight and bias go to the run cache (``shared-<name>.safetensors``) and the
module stays dense, so that layer's outputs propagate from the dense weight (as ``propagate: original`` would for
it). When the group's last layer is done, the dictionary is fitted, every member is replaced (the first one present
owns the dictionary, the others name it in ``shared_from``; a member left out by ``targets``/``ignore`` is no
member: the plan sizes the group from the present ones, ``CoSpaDi.cost_args``), the finished blocks of the group are
saved again, and the stashed statistics are removed once the current block is saved. Nothing but the group's
statistics waits: the dense model is not held. A crash at any point resumes: a member's statistics stay on disk
until its group's last block is saved, refitting is deterministic (seeded), and an earlier block saved again before
the crash (already holding its ``DictLinear``) is refitted like one still dense. Not yet covered: a crash inside
that second save, between the block's new weights and its new record (``RunCache.save_block`` writes them one after
the other). The fit runs on the engine's device (``engine.device``).
"""
from __future__ import annotations

import time

import torch

from ..errors import LrcError
from ..linalg import weighted_error
from ..methods import METHODS
from .decompose import built_row, effective_weight


def is_shared(row) -> bool:
    return bool(row.factorize) and not row.compensation and getattr(row, "cost_args", {}).get("layers", 1) > 1


def _dtype_device(module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the module a new member replaces: the dense Linear stashed, or (a resume after a
    crash between the group's saves) the ``DictLinear`` its block was saved with."""
    p = module.weight if isinstance(getattr(module, "weight", None), torch.Tensor) else module.values
    return p.dtype, p.device


def _key(row) -> tuple:
    """The group of ``row``: its stage, the group's first block and the projection's name within a block."""
    suffix = row.name.split(f".{row.block}.", 1)[1]
    return row.stage, row.cost_args["group_first"], suffix


class SharedGroups:
    def __init__(self, plan: list, recipe, cache, device: torch.device | str | None = None):
        """``device``: where the dictionaries are fitted (default: the recipe's ``engine.device``, resolved)."""
        self.recipe, self.cache, self._device = recipe, cache, device
        self.groups: dict[tuple, list] = {}
        for r in plan:
            if is_shared(r):
                self.groups.setdefault(_key(r), []).append(r)
        for rows in self.groups.values():
            rows.sort(key=lambda r: r.block)

    @property
    def device(self) -> torch.device:
        if self._device is None:
            from .pipeline import resolve_device

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
        """Fit every group whose last layer is ``block``, put the new modules into the blocks (``get_block(i)``), and
        return ``{block: (module specs, report rows)}`` of every member.

        The fit (and each member's error) runs on ``self.device``; each new module then goes to the device of the
        module it replaces. A member may already hold its ``DictLinear`` (a resume after a crash between the group's
        saves: its block was saved again before the last one was): it is replaced by the same refit."""
        from ..checkpoint.modeling_lrc import DictLinear
        from ..checkpoint.units import module_spec

        out: dict[int, tuple[dict, list]] = {}
        dev = self.device
        for rows in self.completed_at(block):
            t0 = time.perf_counter()
            saved = [self.cache.load_tensors(f"shared-{r.name}") for r in rows]
            missing = [r.name for r, t in zip(rows, saved) if t is None]
            if missing:
                raise LrcError(f"{self.cache.dir}: the statistics of {missing[0]} for its shared dictionary are "
                               "missing; the run cache cannot be resumed (rerun without --resume)")
            saved = [{k: v.to(dev) for k, v in t.items()} for t in saved]
            head = rows[0]
            method = METHODS[head.method](self.recipe.method_config(head.stage))
            fit, wh = method.fit([t["weight"] for t in saved], [t["gram"] for t in saved], head.rank)
            D = wh.dewhiten(fit.D.double()).T.contiguous()
            info = method.fit_info(fit, wh, time.perf_counter() - t0)
            note = info.pop("note") + f"; dictionary shared by {len(rows)} layers (owner {head.name})"
            seconds = info.pop("seconds")
            m = head.out_features
            owner = None
            built = []
            for j, (r, t) in enumerate(zip(rows, saved)):  # every member on the fit's device first (one dictionary)
                index, coef = fit.index[j * m:(j + 1) * m], fit.coef[j * m:(j + 1) * m].double()
                target = get_block(r.block)
                rel = r.name.removeprefix(f"{prefix}.{r.block}.")
                dt, to = _dtype_device(target.get_submodule(rel))
                mod = DictLinear.from_sparse(D if owner is None else owner, index, coef, t.get("bias"),
                                             shared_from=None if owner is None else head.name, dtype=dt)
                if owner is None:
                    owner = mod
                error = weighted_error(t["weight"].double(), effective_weight(mod), t["gram"])
                built.append((r, target, rel, to, mod, error))
            for j, (r, target, rel, to, mod, error) in enumerate(built):
                target.set_submodule(rel, mod.to(to))
                row = built_row(r, mod, error, {**info, "note": note}, seconds if j == 0 else 0.0)
                specs, report = out.setdefault(r.block, ({}, []))
                specs[r.name] = module_spec(mod)
                report.append(row)
        return out

    def cleanup(self, block: int) -> None:
        """Remove the statistics of the groups completed at ``block`` (after it is saved)."""
        for rows in self.completed_at(block):
            for r in rows:
                (self.cache.dir / f"shared-{r.name}.safetensors").unlink(missing_ok=True)
