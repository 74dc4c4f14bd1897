"""MoDeGPT (Lin et al., ICLR 2025, arXiv 2408.09632; methods.md §5): modular decomposition of each decoder block into
plain dense Linears of smaller shapes.

Three units per block, each solved in closed form on calibration statistics (fp64, ``compress/structured.py``):

- ``mlp`` (type I, Alg. 1): keep k_m intermediate neurons by ridge leverage scores of down_proj's input Gram
  C_σ; gate/up keep those rows, down_proj becomes the Nyström (= least-squares) fit ``W_down C_σ S (Sᵀ C_σ S)^+``.
- ``qk`` (type II, Alg. 2): keep k_qk head dims per KV group, scored by the CR bound √(C_Q,ii · C_K,ii) summed over
  RoPE pairs (i, i + d/2) so the kept set is closed under ``rotate_half``; the rebuilt attention gathers cos/sin at
  the kept dims and keeps the scaling 1/√(original head dim). Exact for a pair-closed set. Its report row has no
  ``rel_error`` (the logits' ‖ΔY‖/‖Y‖ is not measured) but ``dropped_score_share``, the CR bound's dropped share.
- ``vo`` (type III, Alg. 3): per KV group, the rank-k_vo approximation of W_O,g W_V,g in the input-Gram-weighted
  norm (joint over the group's query heads under GQA); the v bias folds into an o bias.

All three units of layer l keep ``⌈(1 − φ_l)·d⌉`` of their d dims (q/k: whole RoPE pairs, rounded up;
``structured.kept_dims``); ``φ_l`` comes from the stage's allocator:
``uniform`` (φ_l = 1 − param_ratio) or MoDeGPT's ``block_influence`` (φ_l = L·φ_avg·softmax(−s_l/ε), capped).
The statistics are declared per unit (``statistics``): the engine collects them in passes over the block, in call
order, so the MLP's Gram is taken after the attention is compressed (``engine.sequential``) or from the dense
block (``sequential: false``).
"""
from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .. import structured as S
from .base import Method, MethodConfig, register

UnitKind = Literal["mlp", "qk", "vo"]


class MoDeGPTConfig(MethodConfig):
    modules: list[UnitKind] = Field(["mlp", "qk", "vo"], min_length=1,
                                    description="unit types to compress: mlp (type I), qk (type II), vo (type III)")
    ridge: float = Field(1e-2, gt=0, description="type I ridge λ = ridge · tr(C_σ)/d_int (relative to the Gram's "
                                                 "scale; the unofficial codes' 1e-2 on mean Grams)")


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

    @staticmethod
    def statistics(row) -> dict[str, list[tuple[str, str]]]:
        """Declarative: collector name → [(role, module name)] this unit needs. ``output_sq``: per output channel
        Σ y² (the diagonal of C_Q / C_K; a RoPE pair's sum is rotation-invariant, so pre-RoPE outputs give the
        post-RoPE pair scores); ``input_gram``: Σ xxᵀ of the module's input."""
        m = row.members
        if row.kind == "mlp":
            return {"input_gram": [("down", m["down"])]}
        if row.kind == "qk":
            return {"output_sq": [("q", m["q"]), ("k", m["k"])]}
        return {"input_gram": [("v", m["v"])]}

    # ---------------------------------------------------------------- surgery (one block, modules replaced in place)

    @torch.no_grad()
    def apply_mlp(self, block: nn.Module, prefix: str, row, stats: dict) -> tuple[dict, dict]:
        """Type I on ``row``'s gate/up/down. Returns (specs of the new Linears, report row)."""
        t0 = time.perf_counter()
        rel = {r: n.removeprefix(prefix) for r, n in row.members.items()}
        gate, up, down = (block.get_submodule(rel[r]) for r in ("gate", "up", "down"))
        C = stats["input_gram"][row.members["down"]].double()
        Wd = down.weight.detach().double()
        scores, _ = S.ridge_leverage(C, self.config.ridge)
        keep = S.nystrom_keep(C, row.knob, self.config.ridge, scores)
        Wn = S.nystrom_down(Wd, C, keep)
        D = Wd.clone()
        D[:, keep.to(D.device)] -= Wn
        err = _weighted(D, Wd, C)
        new = {"gate": _rows(gate, keep), "up": _rows(up, keep), "down": _linear(Wn, down.bias, down)}
        specs = {}
        for r, mod in new.items():
            block.set_submodule(rel[r], mod)
            specs[row.members[r]] = {"type": "dense", "in_features": mod.in_features,
                                     "out_features": mod.out_features, "bias": mod.bias is not None}
        note = f"kept {row.knob}/{row.dim} neurons; leverage scores min {scores.min():.3g} max {scores.max():.3g}"
        return specs, _info(row, err, t0, note)

    @torch.no_grad()
    def apply_attention(self, block: nn.Module, prefix: str, att, rows: dict, stats: dict) -> tuple[dict, list]:
        """Types II and III on one attention module (``rows``: kind → UnitRow, either may be absent), rebuilt once
        as an ``LrcAttention`` with its per-layer q/k and v/o head dims."""
        from ..checkpoint.modeling_lrc import LrcAttention

        mods = {r: block.get_submodule(n) for r, n in att.members.items()}
        base = block.get_submodule(att.path)
        H, Hkv, d = att.num_heads, att.num_kv_heads, att.head_dim
        dev = mods["q"].weight.device
        infos = []
        Wq, bq, Wk, bk = (mods["q"].weight, mods["q"].bias, mods["k"].weight, mods["k"].bias)
        index = torch.arange(d, device=dev).repeat(Hkv, 1)
        if "qk" in rows and rows["qk"].factorize:
            t0, row = time.perf_counter(), rows["qk"]
            cq = stats["output_sq"][row.members["q"]].double().view(H, d)
            ck = stats["output_sq"][row.members["k"]].double().view(Hkv, d)
            index = S.qk_pair_index(cq, ck, row.knob, H, Hkv).to(dev)
            Wq, bq, Wk, bk = S.select_qk(Wq, bq, Wk, bk, index, H, Hkv)
            infos.append(_info(row, None, t0, f"kept {row.knob}/{d} q/k head dims ({row.knob // 2} RoPE pairs per "
                               "KV group)", dropped_score_share=_score_dropped(cq, ck, index, H, Hkv)))
        Wv, bv, Wo, bo = (mods["v"].weight, mods["v"].bias, mods["o"].weight, mods["o"].bias)
        vo_dim = d
        if "vo" in rows and rows["vo"].factorize:
            t0, row = time.perf_counter(), rows["vo"]
            C = stats["input_gram"][row.members["v"]].double()
            res = S.vo_grouped(C, Wv.double(), None if bv is None else bv.double(), Wo.double(), row.knob, H, Hkv)
            Wv, bv, Wo = res["Wv"], None, res["Wo"]
            if mods["v"].bias is not None:
                bo = (bo.double() if bo is not None else 0) + res["bo_add"]
            vo_dim = row.knob
            infos.append(_info(row, float(res["rel_error"]), t0, f"kept {row.knob}/{d} v/o head dims"
                               + ("; v bias folded into o" if mods["v"].bias is not None else "")))
        qk_dim = Wq.shape[0] // H
        bias = {"q": bq is not None, "k": bk is not None, "v": bv is not None, "o": bo is not None}
        dtype = mods["q"].weight.dtype
        new = LrcAttention.from_base(base, qk_dim, vo_dim, index, bias, dtype=dtype).to(dev)
        for name, W, b in (("q_proj", Wq, bq), ("k_proj", Wk, bk), ("v_proj", Wv, bv), ("o_proj", Wo, bo)):
            lin = getattr(new, name)
            lin.weight.copy_(W.to(dtype))
            if b is not None:
                lin.bias.copy_(b.to(dtype))
        block.set_submodule(att.path, new)
        return {f"{prefix}{att.path}": new.spec()}, infos


def _linear(W: torch.Tensor, bias, like: nn.Linear) -> nn.Linear:
    dt, dev = like.weight.dtype, like.weight.device
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=dev, dtype=dt)
    lin.weight.copy_(W.to(dt))
    if bias is not None:
        lin.bias.copy_(bias.to(dt))
    return lin


def _rows(mod: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    keep = keep.to(mod.weight.device)
    return _linear(mod.weight[keep], None if mod.bias is None else mod.bias[keep], mod)


def _weighted(D: torch.Tensor, W: torch.Tensor, C: torch.Tensor) -> float:
    """``||D X|| / ||W X||`` from the Gram ``C = X Xᵀ``."""
    num = torch.einsum("ij,jk,ik->", D, C, D).clamp_min(0)
    den = torch.einsum("ij,jk,ik->", W, C, W)
    return float((num / den).sqrt()) if den > 0 else 0.0


def _score_dropped(cq, ck, index, H, Hkv) -> float:
    """The CR bound's share left out: Σ of dropped pair scores over all pair scores (over the KV groups)."""
    G, d = H // Hkv, cq.shape[1]
    half = d // 2
    total = dropped = 0.0
    for g in range(Hkv):
        q = cq[g * G:(g + 1) * G].sum(0)
        pair = ((q[:half] + q[half:]) * (ck[g, :half] + ck[g, half:])).clamp_min(0).sqrt()
        kept = torch.zeros(half, dtype=torch.bool)
        kept[index[g][index[g] < half].cpu()] = True
        total += float(pair.sum())
        dropped += float(pair[~kept.to(pair.device)].sum())
    return dropped / total if total > 0 else 0.0


def _info(row, err: float | None, t0: float, note: str, **fields) -> dict:
    """The unit's report row: ``err`` is ‖ΔY‖/‖Y‖ (None: not measured, q/k), ``fields`` the unit's own
    (``dropped_score_share`` of q/k)."""
    from ..plan_units import unit_report

    return unit_report(row, err, time.perf_counter() - t0, note, **fields)
