"""Parity of lrc's round-to-nearest quantizer with torchao's (issue 25, "baselines inside lrc … checked for parity
against a well-kept quantization library"): every block Linear of a model quantized by both, 4-bit asymmetric groups
of ``--group`` columns (torchao 0.18 ``IntxWeightOnlyConfig(int4, PerGroup(g), ASYMMETRIC)``; torchao needs g to
divide every input size: 64 for SmolLM2's 576 and 1536, hence the default), the dequantized weights compared
matrix by matrix and the WikiText-2 perplexity of both models side by side in one process (not a test; torchao is no
dependency of lrc: ``pip install --target DIR torchao==0.18.0`` and put DIR on PYTHONPATH).

lrc is run twice: with float32 scales (torchao's convention: the weights should agree to float round-off) and with
its default float16 scales (what its checkpoints store).

    PYTHONPATH=/tmp/torchao_pkg python scripts/quant_parity.py --windows 32
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("LRC_SHARED", ROOT.parent / "shared"))
WIKI = SHARED / "data" / "wikitext2" / "wikitext2_raw_test.jsonl"


def block_linears(model):
    from compress.plan import find_blocks

    prefix, blocks = find_blocks(model)
    return [(f"{prefix}.{i}.{n}", m) for i, b in enumerate(blocks) for n, m in b.named_modules()
            if type(m) is torch.nn.Linear]


def main() -> None:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    from compress.eval.data import load_eval_text
    from compress.eval.perplexity import perplexity
    from compress.models import load_model
    from compress.quant import QuantSpec, rtn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("LRC_THREADS", "2")))
    model, tok, _ = load_model(a.model)
    text = load_eval_text(str(WIKI))
    models = {"torchao": copy.deepcopy(model), "lrc-fp32-scales": copy.deepcopy(model),
              "lrc-fp16-scales": copy.deepcopy(model)}
    ao = models["torchao"]
    quantize_(ao, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(a.group),
                                       mapping_type=MappingType.ASYMMETRIC),
              filter_fn=lambda m, fqn: type(m) is torch.nn.Linear and ".layers." in fqn)
    ref = {n: ao.get_submodule(n).weight.dequantize().double() for n, _ in block_linears(model)}
    diffs = {}
    for name, scale in (("lrc-fp32-scales", "float32"), ("lrc-fp16-scales", "float16")):
        worst = 0.0
        for n, m in block_linears(models[name]):
            w = rtn(m.weight.detach().double(), QuantSpec(bits=4, group_size=a.group, scale_dtype=scale))
            d = w.dequantize(torch.float64)
            worst = max(worst, float((d - ref[n]).abs().max() / ref[n].abs().max()))
            with torch.no_grad():
                m.weight.copy_(d.to(m.weight.dtype))
        diffs[name] = worst
    out = {"dense": perplexity(model, tok, text, seq_len=512, max_windows=a.windows).perplexity}
    for name, m in models.items():
        out[name] = perplexity(m, tok, text, seq_len=512, max_windows=a.windows).perplexity
    result = {"model": a.model, "windows": a.windows, "group_size": a.group, "perplexity": out,
              "max_weight_difference_vs_torchao": diffs,
              "definition": "max over matrices of max|Ŵ_lrc − Ŵ_torchao| / max|Ŵ_torchao|"}
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
