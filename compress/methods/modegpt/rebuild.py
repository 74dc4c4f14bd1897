"""MoDeGPT's surgery on one block (Lin et al., ICLR 2025, arXiv 2408.09632, Alg. 1-3): the closed forms of
``math.py`` applied to a block's modules, replaced in place by plain dense Linears of smaller shapes (type I, the MLP)
or one ``LrcAttention`` with per-layer q/k and v/o head dims (types II and III).

``rebuild`` takes the units of one parent module (a phase of the engine's block-unit path) and returns the specs of
the new modules and the units' report rows; a unit whose allocation keeps every dim is left as it is.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from . import math as M
from .lrc_attention import LrcAttention
from .rows import kept_report, unit_report

ATTENTION = ("qk", "vo")  # the unit kinds that live in the attention module (rebuilt together)


def rebuild(block: nn.Module, roles, rows: list, stats: dict, ridge: float) -> tuple[dict, list]:
    """The units ``rows`` of one parent module (``roles``: the block's ``BlockRoles``); (specs, report rows)."""
    specs, report = {}, []
    att_rows = {r.kind: r for r in rows if r.kind in ATTENTION}
    if att_rows and any(r.factorize for r in att_rows.values()):
        s, infos = attention(block, roles.prefix, roles.att, att_rows, stats)
        specs.update(s)
        report += infos
    for r in att_rows.values():
        if not r.factorize:
            report.append(kept_report(r))
    for r in (r for r in rows if r.kind == "mlp"):
        if r.factorize:
            s, info = mlp(block, roles.prefix, r, stats, ridge)
            specs.update(s)
            report.append(info)
        else:
            report.append(kept_report(r))
    return specs, report


@torch.no_grad()
def mlp(block: nn.Module, prefix: str, row, stats: dict, ridge: float) -> tuple[dict, dict]:
    """Type I (Alg. 1) on ``row``'s gate/up/down: keep ``row.knob`` neurons by ridge leverage of down_proj's input
    Gram, down_proj refitted by Nyström. Returns (specs of the new Linears, report row)."""
    t0 = time.perf_counter()
    rel = {r: n.removeprefix(prefix) for r, n in row.members.items()}
    gate, up, down = (block.get_submodule(rel[r]) for r in ("gate", "up", "down"))
    C = stats["input_gram"][row.members["down"]].double()
    Wd = down.weight.detach().double()
    scores, _ = M.ridge_leverage(C, ridge)
    keep = M.nystrom_keep(C, row.knob, ridge, scores)
    Wn = M.nystrom_down(Wd, C, keep)
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
def attention(block: nn.Module, prefix: str, att, rows: dict, stats: dict) -> tuple[dict, list]:
    """Types II (Alg. 2) and III (Alg. 3) on one attention module (``rows``: kind → UnitRow, either may be absent),
    rebuilt once as an ``LrcAttention`` with its per-layer q/k and v/o head dims."""
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
        index = M.qk_pair_index(cq, ck, row.knob, H, Hkv).to(dev)
        Wq, bq, Wk, bk = M.select_qk(Wq, bq, Wk, bk, index, H, Hkv)
        infos.append(_info(row, None, t0, f"kept {row.knob}/{d} q/k head dims ({row.knob // 2} RoPE pairs per "
                           "KV group)", dropped_score_share=_score_dropped(cq, ck, index, H, Hkv)))
    Wv, bv, Wo, bo = (mods["v"].weight, mods["v"].bias, mods["o"].weight, mods["o"].bias)
    vo_dim = d
    if "vo" in rows and rows["vo"].factorize:
        t0, row = time.perf_counter(), rows["vo"]
        C = stats["input_gram"][row.members["v"]].double()
        res = M.vo_grouped(C, Wv.double(), None if bv is None else bv.double(), Wo.double(), row.knob, H, Hkv)
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
    return unit_report(row, err, time.perf_counter() - t0, note, **fields)
