"""Quantized storage of a block's Linears after its stages (``recipe.quantize``; ``compress/quant``, methods.md
§15): every ``nn.Linear`` the block holds now — a low-rank pair's two factors, a MoDeGPT resized Linear, a
dictionary's atoms, a Linear left dense — becomes a ``QuantLinear`` (``quant/lrc_quant.py``).

One pass of the block over the compressed stream's calibration inputs collects each Linear's input Gram ``H = Σ xxᵀ``
(a factor pair's second half sees the first half's outputs, so its Gram is ``B H_x Bᵀ`` as measured); GPTQ
(Frantar et al. 2023, Alg. 1) feeds each column's error forward with it, RTN ignores it. Each matrix's report row has
the weighted error ``‖(W − Ŵ)X‖/‖WX‖`` from the same Gram and its bytes before and after. The block's outputs are
then recomputed from the quantized block (with compressed propagation), so the next block sees quantization error
as a deployed model would (GPTQ's sequential order over blocks).

With ``quantize.compensate`` a registered compensation method (EoRA) then wraps each ``QuantLinear`` in a residual
path of the section's rank, fitted on the same Gram to the error ``W − Q(W)`` (``Method.repair``; EoRA's own use,
methods.md §7), before the outputs are recomputed: the next block's inputs and Grams come through compensated
modules, as EoRA collects them. The row's ``rel_error`` is then the compensated error (``quant_error`` before it)
and its ``bytes_after`` includes the residual (``residual_bytes``).

With ``quantize.embeddings`` the token embeddings become a ``QuantEmbedding`` (RTN) before the first block
(``quantize_embeddings``, called by the pipeline after a resume restored the finished blocks and before block 0's
inputs are captured): the calibration streams then carry the embeddings a deployed model has, like the blocks' own
quantization error. RTN is a function of the weights alone, so a resumed run quantizes them again to the same bytes
(the run cache holds the blocks only). A head tied to the embeddings becomes a ``QuantTiedHead`` that uses the
quantized table (stored once) and the config no longer ties them (``tie_word_embeddings: false``: transformers would
tie ``lm_head.weight`` to a ``weight`` the embeddings no longer have); an untied head becomes a ``QuantLinear``.
"""
from __future__ import annotations

import re
import time

import torch
from torch import nn

from ..errors import LrcError
from ..checkpoint.module_types import effective_weight, module_spec, residual_paths
from ..linalg import weighted_error
from ..methods import METHODS
from ..plan import wanted
from ..quant import QuantEmbedding, QuantLinear, QuantSpec, QuantTiedHead, gptq, rtn
from ..quant.module_type import embedding_spec, quant_spec, tied_head_spec
from .passes import run_pass
from .stats import COLLECTORS


def targets(block: nn.Module, prefix: str, cfg) -> list[str]:
    """The block's plain ``nn.Linear`` modules (names relative to the block) the section selects."""
    want = [re.compile(t) for t in cfg.targets] if cfg.targets else None
    ignore = [re.compile(t) for t in cfg.ignore]
    return [sub for sub, mod in block.named_modules() if type(mod) is nn.Linear and wanted(prefix + sub, want, ignore)]


def widths(rows, prefix: str) -> dict[str, int]:
    """Module name (relative to the block) → the bit width a byte-budget search chose for it (``row.bits``; 16: left
    unquantized); modules of rows without one are absent (they get ``quantize.bits``)."""
    return {m.removeprefix(prefix): r.bits for r in rows if getattr(r, "bits", None) is not None
            for m in r.modules()}


def width_of(name: str, chosen: dict[str, int]) -> int | None:
    """The width of Linear ``name``: its own module's, or that of the module it is part of (a factor
    ``<module>.first``)."""
    while name:
        if name in chosen:
            return chosen[name]
        name = name.rpartition(".")[0]
    return None


def _filled(new: QuantLinear, q, W: torch.Tensor, H: torch.Tensor | None, method: str, bytes_before: int
            ) -> tuple[QuantLinear, dict]:
    """``new`` (a ``QuantLinear`` or ``QuantEmbedding``) holding ``q``'s packed tensors, and its report fields:
    the weighted error ``‖(W − Ŵ)X‖/‖WX‖`` (plain relative error without a Gram ``H``), bytes before and after."""
    for k, v in q.to_packed().items():
        getattr(new, k).copy_(v)
    err = weighted_error(W, q.dequantize(torch.float64).to(W.device), H)
    return new, {"bits": q.spec.bits, "group_size": q.spec.group_size, "method": method, "rel_error": err,
                 "bytes_before": bytes_before, "bytes_after": new.storage_bytes()}


@torch.no_grad()
def quantize_linear(mod: nn.Linear, gram: torch.Tensor | None, cfg, spec: QuantSpec | None = None,
                    method: str | None = None) -> tuple[QuantLinear, dict]:
    """``mod`` as a ``QuantLinear`` (same device and dtype) and its report fields; ``spec`` and ``method`` default to
    the section's."""
    spec, method = spec or cfg.spec(), method or cfg.method
    W = mod.weight.detach().double()
    H = gram.double().to(W.device) if gram is not None else None
    q = gptq(W, H, spec, damp=cfg.damp, act_order=cfg.act_order) if method == "gptq" else rtn(W, spec)
    new = QuantLinear(mod.in_features, mod.out_features, spec.bits, spec.group_size, spec.symmetric,
                      mod.bias is not None, spec.torch_scale_dtype, dtype=mod.weight.dtype)
    if mod.bias is not None:
        new.bias.copy_(mod.bias)
    new, info = _filled(new, q, W, H, method, sum(p.numel() * p.element_size() for p in mod.parameters()))
    return new.to(mod.weight.device), info


def compensated(method, quantized: QuantLinear, mod: nn.Linear, gram: torch.Tensor | None, cfg, info: dict
                ) -> tuple[nn.Module, dict]:
    """``quantized`` with ``method``'s residual (``cfg.compensate``) repairing its error against ``mod``'s weight,
    its two factors quantized too when ``compensate.bits`` is below 16 (the section's method: GPTQ's second factor
    sees the first's quantized outputs, Gram ``Â H Âᵀ``), and ``info`` updated: ``rel_error`` after the repair
    (``quant_error`` before it), ``bytes_after`` with the residual's bytes."""
    comp = cfg.compensate
    W = mod.weight.detach()
    new, fix = method.repair(quantized, W, gram, comp.rank)
    if comp.bits < 16:
        spec = cfg.spec(comp.bits)
        H = gram.double().to(W.device)
        qa, _ = quantize_linear(new.lora_A, H, cfg, spec)
        A = qa.weight_approx.double()
        qb, _ = quantize_linear(new.lora_B, A @ H @ A.T, cfg, spec)
        new.lora_A, new.lora_B = qa, qb
        fix["rel_error"] = weighted_error(W.double(), effective_weight(new).to(W.device), H)
        fix["residual_bytes"] = qa.storage_bytes() + qb.storage_bytes()
    return new, {**info, "quant_error": info["rel_error"], "rel_error": fix["rel_error"],
                 "compensated_rank": fix["rank"], "residual_bits": comp.bits, "residual_bytes": fix["residual_bytes"],
                 "bytes_after": info["bytes_after"] + fix["residual_bytes"]}


def quantize_block(job, cfg) -> list[dict]:
    """Quantize block ``job.index``'s selected Linears in place (specs into ``job.specs``), then recompute every
    stream's outputs when the compressed model propagates; returns one report row per matrix."""
    t0 = time.perf_counter()
    block, prefix, main, eng = job.block, job.prefix, job.main, job.eng
    chosen = widths(job.rows, prefix)
    names = [n for n in targets(block, prefix, cfg) if width_of(n, chosen) != 16]
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
    repair = METHODS[cfg.compensate.method]() if cfg.compensate else None
    for n in names:
        bits = width_of(n, chosen) or cfg.bits
        job.progress.phase(f"quantize {n} ({cfg.method}, int{bits})")
        t = time.perf_counter()
        m = modules[n]
        new, info = quantize_linear(m, gram.acc.get(n), cfg, cfg.spec(bits))
        if repair is not None:
            new, info = compensated(repair, new, m, gram.acc.get(n), cfg, info)
        block.set_submodule(n, new)
        job.specs[prefix + n] = module_spec(new)
        for sub in residual_paths(new):  # quantized residual factors: specs of their own, built after the module
            if isinstance(getattr(new, sub), QuantLinear):
                job.specs[f"{prefix}{n}.{sub}"] = quant_spec(getattr(new, sub))
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


@torch.no_grad()
def quantize_table(emb: nn.Embedding, spec: QuantSpec) -> tuple[QuantEmbedding, dict]:
    """``emb`` as a ``QuantEmbedding`` (RTN; same device and dtype) and its report fields (``rel_error``:
    ``‖W − Ŵ‖/‖W‖``, no Gram: a lookup has no inputs to weight it)."""
    W = emb.weight.detach().double()
    new = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, spec.bits, spec.group_size, spec.symmetric,
                         spec.torch_scale_dtype, dtype=emb.weight.dtype)
    new, info = _filled(new, rtn(W, spec), W, None, "rtn", emb.weight.numel() * emb.weight.element_size())
    return new.to(emb.weight.device), info


def _untie(model) -> None:
    """The config no longer ties the head to the embeddings (and the model forgets the tie it computed at init)."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=False)


def quantize_embeddings(model, cfg) -> tuple[dict, list[dict]]:
    """Replace ``model``'s input embeddings by a ``QuantEmbedding`` and its output head by a ``QuantTiedHead``
    (tied) or a ``QuantLinear`` (untied), RTN with ``cfg.embeddings``; returns ``(specs, report rows)``."""
    t0 = time.perf_counter()
    spec, names = cfg.embeddings.spec(cfg.scale_dtype), {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    name = names.get(id(emb))
    if type(emb) is not nn.Embedding or name is None:
        raise LrcError(f"quantize.embeddings: the input embeddings are a {type(emb).__name__}, not a plain "
                       "nn.Embedding (one that scales or mixes its rows is not supported)")
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    if head is not None and not tied and type(head) is not nn.Linear:
        raise LrcError(f"quantize.embeddings: the output head is a {type(head).__name__}, not an nn.Linear")
    new, info = quantize_table(emb, spec)
    model.set_submodule(name, new)
    specs = {name: embedding_spec(new)}
    rows = [{"name": name, "kind": "embeddings", "out_features": new.num_embeddings,
             "in_features": new.embedding_dim, **info, "tied_head": names[id(head)] if tied else None}]
    if head is not None:
        hname = names[id(head)]
        if tied:
            tied_head = QuantTiedHead(name, new.embedding_dim, new.num_embeddings)
            tied_head.lrc_link(lambda _: new)
            model.set_submodule(hname, tied_head)
            specs[hname] = tied_head_spec(tied_head)
        else:
            qhead, hinfo = quantize_linear(head, None, cfg, spec, "rtn")
            model.set_submodule(hname, qhead)
            specs[hname] = quant_spec(qhead)
            rows.append({"name": hname, "kind": "head", "out_features": head.out_features,
                         "in_features": head.in_features, **hinfo})
    _untie(model)
    rows[0]["seconds"] = round(time.perf_counter() - t0, 4)
    return specs, rows
