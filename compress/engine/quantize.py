"""Quantized storage of a block's Linears after its stages (``recipe.quantize``; ``compress/quant``, methods.md
§15): every ``nn.Linear`` the block holds now — a low-rank pair's two factors, a MoDeGPT resized Linear, a
dictionary's atoms, a Linear left dense — becomes a ``QuantLinear`` (``quant/lrc_quant.py``).

One pass of the block over the compressed stream's calibration inputs collects each Linear's input Gram ``H = Σ xxᵀ``
(a factor pair's second half sees the first half's outputs, so its Gram is ``B H_x Bᵀ`` as measured); GPTQ
(Frantar et al. 2023, Alg. 1) feeds each column's error forward with it, RTN ignores it. Each matrix's report row has
the weighted error ``‖(W − Ŵ)X‖/‖WX‖`` from the same Gram and its bytes before and after. The block's outputs are
then recomputed from the quantized block (with compressed propagation), so the next block sees quantization error
as a deployed model would (GPTQ's sequential order over blocks).
"""
from __future__ import annotations

import re
import time

import torch
from torch import nn

from ..plan import wanted
from ..quant import QuantLinear, QuantSpec, gptq, rtn
from ..quant.module_type import quant_spec
from .passes import run_pass
from .stats import COLLECTORS


def targets(block: nn.Module, prefix: str, cfg) -> list[str]:
    """The block's plain ``nn.Linear`` modules (names relative to the block) the section selects."""
    want = [re.compile(t) for t in cfg.targets] if cfg.targets else None
    ignore = [re.compile(t) for t in cfg.ignore]
    return [sub for sub, mod in block.named_modules() if type(mod) is nn.Linear and wanted(prefix + sub, want, ignore)]


def spec_of(cfg) -> QuantSpec:
    return QuantSpec(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric, scale_dtype=cfg.scale_dtype)


@torch.no_grad()
def quantize_linear(mod: nn.Linear, gram: torch.Tensor | None, cfg) -> tuple[QuantLinear, dict]:
    """``mod`` as a ``QuantLinear`` (same device and dtype) and its report fields."""
    spec = spec_of(cfg)
    W = mod.weight.detach().double()
    H = gram.double() if gram is not None else None
    q = gptq(W, H, spec, damp=cfg.damp, act_order=cfg.act_order) if cfg.method == "gptq" else rtn(W, spec)
    new = QuantLinear(mod.in_features, mod.out_features, spec.bits, spec.group_size, spec.symmetric,
                      mod.bias is not None, spec.torch_scale_dtype, dtype=mod.weight.dtype)
    for k, v in q.to_packed().items():
        getattr(new, k).copy_(v)
    if mod.bias is not None:
        new.bias.copy_(mod.bias)
    new = new.to(mod.weight.device)
    D = W - q.dequantize(torch.float64).to(W.device)
    if H is not None:
        H = H.to(W.device)
        err = float(torch.sqrt(torch.trace(D @ H @ D.T).clamp_min(0) / torch.trace(W @ H @ W.T).clamp_min(1e-300)))
    else:
        err = float(D.norm() / W.norm().clamp_min(1e-300))
    info = {"bits": spec.bits, "group_size": spec.group_size, "method": cfg.method, "rel_error": err,
            "bytes_before": sum(p.numel() * p.element_size() for p in mod.parameters()),
            "bytes_after": new.storage_bytes()}
    return new, info


def quantize_block(job, cfg) -> list[dict]:
    """Quantize block ``job.index``'s selected Linears in place (specs into ``job.specs``), then recompute every
    stream's outputs when the compressed model propagates; returns one report row per matrix."""
    t0 = time.perf_counter()
    block, prefix, main, eng = job.block, job.prefix, job.main, job.eng
    names = targets(block, prefix, cfg)
    if not names:
        return []
    job.progress.phase(f"statistics of {len(names)} Linear(s) to quantize")
    modules = dict(block.named_modules())
    gram = COLLECTORS["input_gram"](modules, {n: n for n in names})
    try:
        run_pass(block, main.x_in, main.dev_kwargs[job.index], eng.batch_size, job.device)
    finally:
        gram.remove()
    rows = []
    for n in names:
        job.progress.phase(f"quantize {n} ({cfg.method}, int{cfg.bits})")
        t = time.perf_counter()
        new, info = quantize_linear(modules[n], gram.acc.get(n), cfg)
        block.set_submodule(n, new)
        job.specs[prefix + n] = quant_spec(new)
        m = modules[n]
        rows.append({"name": prefix + n, "out_features": m.out_features, "in_features": m.in_features, **info,
                     "seconds": round(time.perf_counter() - t, 4)})
    del gram
    if eng.propagate == "compressed":
        for s in job.streams:
            job.progress.phase("propagate" if len(job.streams) == 1 else f"propagate {s.name}")
            run_pass(block, s.x_in, s.dev_kwargs[job.index], eng.batch_size, job.device, out=job.outs[s.name])
    if rows:
        rows[0]["block_seconds"] = round(time.perf_counter() - t0, 3)
    return rows
