"""CoSpaDi (Makhov et al., arXiv 2509.22075, §3 and Alg. 1; methods.md §6): calibration-guided sparse dictionary
learning. Each Linear ``W`` (m × n) becomes a ``DictLinear``: a dense dictionary map n → k and coefficients with
exactly ``s = ⌊k/ρ⌋`` non-zeros per output neuron, fitted on the whitened weight so that ``‖X(W − W̃)‖_F`` is the
objective (``cospadi/math.py``: eigh root of the input Gram, Batch-OMP, K-SVD by power iteration).

A ``build`` method (``Method.replacement``): the engine hands it each Linear's (target) weight and statistics and
installs the module it returns. Budget: ``param_ratio`` is the kept fraction of STORAGE under the paper's Eq. 10
(values in the checkpoint's dtype plus a 1-bit mask over the k × m coefficient slots; the ``dictionary`` cost model,
``cospadi/cost.py``); ``rank`` gives ``k`` directly. With ``share: layers`` one dictionary serves the same projection
of ``group_size`` consecutive layers (§3.3: fitted on the mean Gram, coefficients per layer): ``shared_group`` names
a row's group, the engine keeps each member's Gram and weight in the run cache until the group's last layer is
reached (``engine/shared.py``) and then calls ``fit_group``.

Paper defaults (Table 8): ρ = 2, T = 60 rounds, 8 power iterations, seed 42, OMP batch 8192 columns.
``omp_atoms_per_step > 1`` (generalised OMP) is lrc's speed option: per_step times fewer OMP steps.
"""
from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ...checkpoint.module_types import register_module_type
from ..base import MODULE_KINDS, Method, MethodConfig, register
from . import math as DL
from .cost import DICTIONARY  # noqa: F401  (registers the ``dictionary`` cost model)
from .lrc_dictionary import DictLinear
from .module_type import DICTIONARY_MODULE

MODULE_KINDS["dictionary"] = "a dictionary module"
MODULE_KINDS["shared-dictionary"] = ("a dictionary shared across blocks (fitted only when the group's last block is "
                                     "reached)")
register_module_type(DICTIONARY_MODULE)


class CoSpaDiConfig(MethodConfig):
    rho: float = Field(2.0, ge=1.0, description="atoms per non-zero, k/s (paper: 2)")
    iterations: int = Field(60, ge=1, description="dictionary-learning rounds T, each OMP then K-SVD (paper: 60)")
    power_iterations: int = Field(8, ge=1, description="power-iteration steps of each K-SVD atom update (paper: 8)")
    tol: float = Field(0.0, ge=0, description="stop once a round improves the relative error by less (0: run all T)")
    init: Literal["columns", "svd"] = Field("columns", description="atoms: random unit-norm columns of the whitened "
                                                                   "weight (paper) or its top singular vectors")
    reinit_unused: bool = Field(False, description="replace atoms no output uses by the worst-coded residual")
    omp_atoms_per_step: int = Field(1, ge=1, description="atoms chosen per OMP step (1: OMP exactly; more: "
                                                         "generalised OMP, that many times fewer steps)")
    omp_chunk: int = Field(8192, ge=16, description="output columns coded at once (paper: 8192)")
    precision: Literal["float32", "float64"] = Field("float32", description="dtype of the dictionary learning "
                                                                            "(the Gram and its root are float64)")
    damping: float = Field(1e-6, ge=0, description="relative ridge on the Gram before its root")
    seed: int = Field(42, description="initialisation seed (paper: 42)")
    share: Literal["none", "layers"] = Field("none", description="layers: one dictionary per projection for "
                                                                 "group_size consecutive layers (paper §3.3)")
    group_size: int = Field(2, ge=2, description="layers per shared dictionary (share: layers)")


@register
class CoSpaDi(Method):
    name = "cospadi"
    description = ("CoSpaDi sparse dictionary learning: dense dictionary + s-sparse coefficients per output, "
                   "whitened K-SVD with Batch-OMP (storage budget, Eq. 10)")
    paper = "Makhov et al., CoSpaDi, arXiv 2509.22075, Sec. 3, Alg. 1"
    config_cls = CoSpaDiConfig
    needs = ("input_gram",)
    unit_kinds_all = ("dictionary",)
    cost_model = "dictionary"
    replacement = "build"

    def __init__(self, config: CoSpaDiConfig | None = None):
        super().__init__(config)
        self._groups: dict[tuple[int, str], list[tuple[int, dict]]] = {}  # (first block, projection) -> members

    def cost_args(self, row, block: int, num_blocks: int, value_bits: int) -> dict:
        """The row's ``cost_args`` for the ``dictionary`` cost model (``cost.py``; sharing groups are runs of blocks).

        With ``share: layers`` the group is the rows planned so far for the same projection of the same run of
        blocks: ``layers`` counts its PRESENT members and ``owner`` marks the first of them (the one the engine gives
        the dictionary, ``engine/shared.py``), so a member left out by ``targets``/``ignore`` neither inflates ``k``
        nor takes the dictionary's ``n·k`` values out of the plan. ``make_plan`` calls this for every row of a stage
        (one method instance) before it allocates; the args of a group's earlier rows are updated in place as later
        members arrive."""
        cfg = self.config
        args = {"rho": cfg.rho, "value_bits": value_bits, "mask_bits": 1.0}
        if cfg.share == "layers":
            first = block - block % cfg.group_size
            suffix = row.name.split(f".{block}.", 1)[-1]
            members = self._groups.setdefault((first, suffix), [])
            members[:] = [m for m in members if m[0] != block] + [(block, args)]
            members.sort(key=lambda m: m[0])
            for b, a in members:
                a |= {"layers": len(members), "owner": b == members[0][0], "group_first": first}
        return args

    def leaves(self) -> str:
        return "shared-dictionary" if self.config.share == "layers" else "dictionary"

    def check_stage(self, stage, si: int) -> str | None:
        """A reason the stage cannot run, or None."""
        if stage.energy is not None:
            return f"stages[{si}]: cospadi takes param_ratio (kept storage) or rank (atoms k); energy is for SVDs"
        return None

    # ------------------------------------------------------------------------------------------------ fitting
    def _dtype(self) -> torch.dtype:
        return torch.float64 if self.config.precision == "float64" else torch.float32

    def fit(self, weights: list[torch.Tensor], grams: list[torch.Tensor], k: int) -> tuple[DL.DictFit, DL.Whitening]:
        """One dictionary for ``weights`` (each m × n, with input Grams ``grams``): the whitened columns of all of
        them side by side, on the root of the mean Gram (one matrix: its own Gram)."""
        cfg = self.config
        H = grams[0].double() if len(grams) == 1 else torch.stack([g.double() for g in grams]).mean(0)
        wh = DL.whitening(H, cfg.damping)
        WL = torch.cat([wh.R @ W.double().T for W in weights], 1).to(self._dtype())
        s = DL.nnz_for(k, cfg.rho)
        fit = DL.learn_dictionary(WL, k, s, cfg.iterations, cfg.power_iterations, cfg.init, cfg.seed, cfg.tol,
                                  cfg.reinit_unused, cfg.omp_chunk, cfg.omp_atoms_per_step)
        return fit, wh

    @torch.no_grad()
    def build(self, weight: torch.Tensor, bias, stats: dict, row, dtype: torch.dtype):
        """``DictLinear`` (in ``dtype``) for one matrix (per-layer mode); returns (module, report fields)."""
        t0 = time.perf_counter()
        fit, wh = self.fit([weight], [stats["input_gram"]], row.rank)
        D = wh.dewhiten(fit.D.double())  # n × k
        module = DictLinear.from_sparse(D.T.contiguous(), fit.index, fit.coef.double(), bias, dtype=dtype)
        return module, self.fit_info(fit, wh, time.perf_counter() - t0)

    # ------------------------------------------------------------------------------- shared dictionaries (§3.3)
    @classmethod
    def shared_group(cls, row) -> tuple | None:
        """With ``share: layers`` (``cost_args`` of more than one layer): the group's first block and the projection's
        name within a block; None for a row fitted alone or kept dense."""
        args = getattr(row, "cost_args", {})
        if not row.factorize or args.get("layers", 1) <= 1:
            return None
        return args["group_first"], row.name.split(f".{row.block}.", 1)[1]

    @torch.no_grad()
    def fit_group(self, rows: list, weights: list[torch.Tensor], grams: list[torch.Tensor], biases: list,
                  dtypes: list[torch.dtype]) -> list[tuple[nn.Module, dict]]:
        """One dictionary for the group: the first member's ``DictLinear`` owns it, the others name it in
        ``shared_from``; each member keeps its own coefficients (rows ``j·m ..`` of the joint fit)."""
        head, m = rows[0], rows[0].out_features
        fit, wh = self.fit(weights, grams, head.rank)
        D = wh.dewhiten(fit.D.double()).T.contiguous()
        info = self.fit_info(fit, wh, 0.0)
        info.pop("seconds")  # the engine times the group (loading its statistics included)
        fields = {**info, "note": info.pop("note") + f"; dictionary shared by {len(rows)} layers (owner {head.name})"}
        owner, out = None, []
        for j, (bias, dtype) in enumerate(zip(biases, dtypes)):
            index, coef = fit.index[j * m:(j + 1) * m], fit.coef[j * m:(j + 1) * m].double()
            mod = DictLinear.from_sparse(D if owner is None else owner, index, coef, bias,
                                         shared_from=None if owner is None else head.name, dtype=dtype)
            if owner is None:
                owner = mod
            out.append((mod, fields))
        return out

    @staticmethod
    def fit_info(fit: DL.DictFit, wh: DL.Whitening, seconds: float) -> dict:
        errs = fit.errors
        # the OMP and atom-update times are the row's seconds_omp / seconds_update: the note holds what the run decided
        note = f"{fit.iterations} rounds, whitened error {errs[0]:.4f} -> {min(errs):.4f}"
        if fit.unused_atoms:
            note += f"; {fit.unused_atoms} unused atoms"
        if wh.dropped:
            note += f"; {wh.dropped} Gram eigenvalues clamped"
        return {"note": note, "rounds": fit.iterations, "seconds_omp": round(fit.seconds["omp"], 3),
                "seconds_update": round(fit.seconds["update"], 3), "whitened_errors": [round(e, 6) for e in errs],
                "seconds": round(seconds, 4)}

