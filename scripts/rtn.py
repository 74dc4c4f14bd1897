"""Round-to-nearest (RTN) weight quantization, de-quantized back to floats: the "model compressed by another tool"
that EoRA's benchmark and tests repair (``lrc compensate DENSE RTN``). Not an lrc method — a baseline maker.

    python scripts/rtn.py smollm2 ~/.cache/lrc/bench/smollm2-rtn4-g128 --bits 4 --group 128
"""
from __future__ import annotations

import argparse

import torch


@torch.no_grad()
def rtn_quantize(model, bits: int = 4, group: int = 128, pattern: str = ".layers."):
    """Asymmetric min/max RTN per group of ``group`` input columns (per output row where groups do not divide) of
    every Linear whose name contains ``pattern``; weights are replaced by their de-quantized values, in place."""
    levels = 2 ** bits - 1
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and pattern in name:
            W = mod.weight
            m, n = W.shape
            k = group if n % group == 0 else n
            g = W.reshape(m, n // k, k)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = (hi - lo).clamp_min(1e-8) / levels
            q = ((g - lo) / scale).round().clamp(0, levels)
            W.copy_((q * scale + lo).reshape(m, n))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    a = ap.parse_args()
    from compress.models import load_model

    model, tok, _ = load_model(a.model)
    rtn_quantize(model, a.bits, a.group).save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print(f"wrote {a.out} ({a.bits}-bit RTN, group {a.group}, de-quantized to float)")


if __name__ == "__main__":
    main()
