"""Fidelity to the dense model without labels: mean token KL(dense ‖ compressed) and top-1 agreement, on the same
windows the perplexity uses (every scored position of every window)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .perplexity import window_logits, window_spans


@dataclass
class KLResult:
    kl: float
    top1_agreement: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def kl_rows(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref_logits) ‖ softmax(logits)) per row of the last axis, in float32 on ``ref_logits``' device
    (differentiable in ``logits``: ``lrc finetune``'s distillation loss is its mean)."""
    p = F.log_softmax(ref_logits.float(), -1)
    q = F.log_softmax(logits.float(), -1).to(p.device)
    return (p.exp() * (p - q)).sum(-1)


@torch.no_grad()
def kl_to_reference(model, reference, ids: torch.Tensor, seq_len: int, stride: int | None = None,
                    max_windows: int | None = None, batch_size: int = 4, bos_id: int | None = None) -> KLResult:
    spans = window_spans(ids.numel(), seq_len, stride, max_windows)
    if stride and stride != seq_len:
        batch_size = 1
    kl_sum, agree, count = 0.0, 0, 0
    ref_batches = window_logits(reference, ids, spans, batch_size, bos_id)
    for (logits, targets), (ref_logits, _) in zip(window_logits(model, ids, spans, batch_size, bos_id), ref_batches):
        mask = targets != -100
        ref = ref_logits[mask].to(logits.device)
        kl_sum += float(kl_rows(ref, logits[mask]).sum())
        agree += int((ref.argmax(-1) == logits[mask].argmax(-1)).sum())
        count += int(mask.sum())
    return KLResult(kl_sum / count, agree / count, count)
