"""MoDeGPT (Lin et al., "MoDeGPT: Modular Decomposition for Large Language Model Compression", ICLR 2025,
arXiv 2408.09632; methods.md §5): modular decomposition of each decoder block into plain dense Linears of smaller
shapes. Its whole home: this package.

Three units per block, each solved in closed form on calibration statistics (fp64, ``math.py``):

- ``mlp`` (type I, Alg. 1): keep k_m intermediate neurons by ridge leverage scores of down_proj's input Gram
  C_σ; gate/up keep those rows, down_proj becomes the Nyström (= least-squares) fit ``W_down C_σ S (Sᵀ C_σ S)^+``.
- ``qk`` (type II, Alg. 2): keep k_qk head dims per KV group, scored by the CR bound √(C_Q,ii · C_K,ii) summed over
  RoPE pairs (i, i + d/2) so the kept set is closed under ``rotate_half``; the rebuilt attention gathers cos/sin at
  the kept dims and keeps the scaling 1/√(original head dim). Exact for a pair-closed set. Its report row has no
  ``rel_error`` (the logits' ‖ΔY‖/‖Y‖ is not measured) but ``dropped_score_share``, the CR bound's dropped share.
- ``vo`` (type III, Alg. 3): per KV group, the rank-k_vo approximation of W_O,g W_V,g in the input-Gram-weighted
  norm (joint over the group's query heads under GQA); the v bias folds into an o bias.

All three units of layer l keep ``⌈(1 − φ_l)·d⌉`` of their d dims (q/k: whole RoPE pairs, rounded up;
``math.kept_dims``, the cost model ``structured`` of ``cost.py``); ``φ_l`` comes from the stage's allocator:
``uniform`` (φ_l = 1 − param_ratio) or ``block_influence`` (Sec. 3.4, ``allocation/influence.py``:
φ_l = L·φ_avg·softmax(−s_l/ε), capped). The plan rows are ``rows.UnitRow``; the surgery is ``rebuild.py``. The
statistics are declared per unit (``statistics``): the engine collects them in passes over the block, in call order,
so the MLP's Gram is taken after the attention is compressed (``engine.sequential``) or from the dense block
(``sequential: false``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field
from torch import nn

from ...checkpoint.module_types import register_module_type
from ...roles import AttentionRoles, MlpRoles, block_roles, check_roles
from ..base import Method, MethodConfig, register
from . import rebuild as R
from .module_type import ATTENTION
from .rows import block_units, parents

UnitKind = Literal["mlp", "qk", "vo"]
register_module_type(ATTENTION)


class MoDeGPTConfig(MethodConfig):
    modules: list[UnitKind] = Field(["mlp", "qk", "vo"], min_length=1,
                                    description="unit types to compress: mlp (type I), qk (type II), vo (type III)")
    ridge: float = Field(1e-2, gt=0, description="type I ridge λ = ridge · tr(C_σ)/d_int (relative to the Gram's "
                                                 "scale; the unofficial codes' 1e-2 on mean Grams)")


@dataclass(frozen=True)
class BlockRoles:
    """One block's attention and MLP roles (either None when no unit needs it); ``prefix``: the block's name + '.'."""

    prefix: str
    att: AttentionRoles | None
    mlp: MlpRoles | None


@register
class MoDeGPT(Method):
    name = "modegpt"
    description = ("MoDeGPT structured decomposition: Nyström MLP, RoPE-pair CR query/key, GQA-joint SVD value/output;"
                   " smaller dense Linears, real speed-up")
    paper = "Lin et al., MoDeGPT, ICLR 2025, arXiv 2408.09632, Alg. 1-3 and Sec. 3.4"
    config_cls = MoDeGPTConfig
    unit = "block"
    unit_kinds_all = ("mlp", "qk", "vo")
    needs = ("input_gram", "output_sq")  # what ``statistics`` declares per unit, for ``lrc methods``

    def leaves(self) -> str:
        return "reshaped"

    def unit_kinds(self) -> list[str]:
        return list(dict.fromkeys(self.config.modules))

    # ------------------------------------------------------------------ the block-method hooks (``methods/base.py``)
    def unit_rows(self, block: nn.Module, config, scope) -> tuple[list, list[str]]:
        return block_units(block, config, scope, self.unit_kinds())

    def roles(self, block: nn.Module, config, rows: list, prefix: str) -> BlockRoles:
        return BlockRoles(prefix, *block_roles(block, config, parents(r.kind for r in rows), prefix.rstrip(".")))

    def check_roles(self, roles: BlockRoles, groups: list[list[str]]) -> None:
        check_roles(groups, roles.att, roles.mlp, roles.prefix.rstrip("."))

    def phases(self, rows: list, roles: BlockRoles) -> list[tuple[str, str, list]]:
        """The attention (q/k and v/o units, rebuilt together as one ``LrcAttention``) and the MLP."""
        out = []
        att_rows = [r for r in rows if r.kind in R.ATTENTION]
        if att_rows:
            out.append(("attention", roles.att.q, att_rows))
        mlp_rows = [r for r in rows if r.kind == "mlp"]
        if mlp_rows:
            out.append(("mlp", roles.mlp.gate, mlp_rows))
        return out

    def statistics(self, row) -> dict[str, list[tuple[str, str]]]:
        """Declarative: collector name → [(role, module name)] this unit needs. ``output_sq``: per output channel
        Σ y² (the diagonal of C_Q / C_K; a RoPE pair's sum is rotation-invariant, so pre-RoPE outputs give the
        post-RoPE pair scores); ``input_gram``: Σ xxᵀ of the module's input."""
        m = row.members
        if row.kind == "mlp":
            return {"input_gram": [("down", m["down"])]}
        if row.kind == "qk":
            return {"output_sq": [("q", m["q"]), ("k", m["k"])]}
        return {"input_gram": [("v", m["v"])]}

    def rebuild(self, block: nn.Module, roles: BlockRoles, rows: list, stats: dict) -> tuple[dict, list]:
        return R.rebuild(block, roles, rows, stats, self.config.ridge)

    # ---------------------------------------------------------------- surgery (one block, modules replaced in place)
    def apply_mlp(self, block: nn.Module, prefix: str, row, stats: dict) -> tuple[dict, dict]:
        """Type I on ``row``'s gate/up/down. Returns (specs of the new Linears, report row)."""
        return R.mlp(block, prefix, row, stats, self.config.ridge)

    def apply_attention(self, block: nn.Module, prefix: str, att, rows: dict, stats: dict) -> tuple[dict, list]:
        """Types II and III on one attention module (``rows``: kind → UnitRow, either may be absent)."""
        return R.attention(block, prefix, att, rows, stats)
