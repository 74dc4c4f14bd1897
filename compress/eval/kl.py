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
        p_log = F.log_softmax(ref_logits[mask].to(logits.device), -1)
        q_log = F.log_softmax(logits[mask], -1)
        kl_sum += float((p_log.exp() * (p_log - q_log)).sum())
        agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        count += int(mask.sum())
    return KLResult(kl_sum / count, agree / count, count)
