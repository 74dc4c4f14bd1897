"""ASVD's sensitivity sweep (STRS, Yuan et al. arXiv 2312.05821 Sec. 3.4; methods.md §3a), streamed block by block.

For every targeted matrix and candidate kept ratio the sweep needs the calibration perplexity of the whole model with
only that matrix replaced by its rank-r approximation. Blocks before the matrix's own see dense inputs either way, so
the sweep starts from the dense hidden states entering that block (the allocation pre-pass has them: its cached
inputs of the first ``samples`` calibration windows), runs the block once per candidate, then the blocks after it
(each brought to the device once for all candidates of the block, ``stream.Host``) and the model's own head
(``stream.head_loss``). The numbers are those of the whole-model forward, for about half its compute on average and
one block in device memory instead of the model.
"""
from __future__ import annotations

import torch

from ..allocation.sensitivity import SensitivityOptions, rank_at
from .capture import move_outside_blocks
from .stream import head_loss, hidden

STATE_BUDGET_BYTES = 1 << 30  # candidates' hidden states kept on the device at once (more: several tail passes)


class Sweep:
    """``sweep(i, block, x_in, pending)`` -> ``{row name: perplexity per candidate ratio (ascending)}`` for the
    ``(module, spectrum, row)`` items of block ``i`` (on the device, dense weights), ``x_in`` its dense inputs.
    ``stored``: a table from an earlier run with the same key; rows found there are not measured again."""

    def __init__(self, model, prefix, blocks, host, ids, kwargs, recipe, progress, stored=None):
        self.model, self.prefix, self.blocks, self.host, self.ids = model, prefix, blocks, host, ids
        self.kwargs, self.recipe, self.progress, self.stored = kwargs, recipe, progress, stored or {}
        self.as_tuple = None

    def __enter__(self):
        move_outside_blocks(self.model, self.blocks, self.host.device)  # the head: embeddings, norm, lm_head
        return self

    def __exit__(self, *exc):
        move_outside_blocks(self.model, self.blocks, "cpu")

    @torch.no_grad()
    def __call__(self, i: int, block, x_in: torch.Tensor, pending: list) -> dict[str, torch.Tensor]:
        out = {row.name: self.stored[row.name] for _, _, row in pending if row.name in self.stored}
        todo = [item for item in pending if item[2].name not in out]
        by_samples: dict[int, list] = {}
        for item in todo:
            stage = self.recipe.stages[item[2].stage]
            by_samples.setdefault(SensitivityOptions.model_validate(stage.allocator_options).samples, []).append(item)
        for samples, items in by_samples.items():
            out.update(self._measure(i, block, x_in[:samples], self.ids[:samples], items))
        return out

    def _measure(self, i, block, h, ids, items) -> dict[str, torch.Tensor]:
        device, kw = self.host.device, self.kwargs
        h = h.to(device)
        candidates = []  # (row name, weight tensor or None, module)
        for module, spectrum, row in items:
            stage = self.recipe.stages[row.stage]
            for ratio in sorted(SensitivityOptions.model_validate(stage.allocator_options).ratios):
                candidates.append((row.name, module, spectrum, min(rank_at(row, ratio, stage.align),
                                                                     int(spectrum.sigma.numel()))))
        per = max(1, STATE_BUDGET_BYTES // (h.numel() * h.element_size()))
        ppl: dict[str, list[float]] = {}
        for c in range(0, len(candidates), per):
            chunk = candidates[c:c + per]
            self.progress.phase(f"sensitivity block {i + 1}: candidates {c + 1}-{c + len(chunk)}/{len(candidates)}")
            states = []
            for _, module, spectrum, rank in chunk:  # this block, once per candidate
                original = module.weight.data.clone()
                try:
                    A, B = spectrum.factors(rank)
                    module.weight.data.copy_((A @ B).to(original.dtype))
                    y, self.as_tuple = hidden(block(h, **kw[i]))
                finally:
                    module.weight.data.copy_(original)
                states.append(y)
            for j in range(i + 1, len(self.blocks)):  # the blocks after it, each loaded once for the chunk
                later = self.host.load(j)
                states = [hidden(later(s, **kw[j]))[0] for s in states]
                self.host.unload(j)
            for (name, *_), s in zip(chunk, states):
                loss = head_loss(self.model, self.prefix, bool(self.as_tuple), s, ids)
                ppl.setdefault(name, []).append(float(torch.exp(loss.double())))
        return {name: torch.tensor(v, dtype=torch.float64) for name, v in ppl.items()}
