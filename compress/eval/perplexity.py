"""Paper-style perplexity (the GPTQ / SVD-LLM protocol).

Join the rows with "\\n\\n", tokenize once without special tokens, cut into non-overlapping windows of ``seq_len``
tokens (the trailing partial window is dropped), score every token of every window except each window's first (it
has no context), and report ``exp(mean token NLL)`` over all scored tokens.

- ``bos=True`` prepends the BOS token to every window; then the window's first token is scored too.
- ``stride < seq_len`` slides the window by ``stride`` tokens and scores only the tokens not scored before (each with
  at least ``seq_len - stride`` tokens of context), the Hugging Face "sliding window" perplexity.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    stride: int
    bos: bool

    def to_dict(self) -> dict:
        return asdict(self)


def window_spans(n_tokens: int, seq_len: int, stride: int | None = None, max_windows: int | None = None
                 ) -> list[tuple[int, int, int]]:
    """``(start, end, first_scored)`` per window: tokens ``[start, end)`` go in, targets from ``first_scored`` on.

    Non-overlapping (``stride`` None or ``seq_len``): full windows only. Sliding: windows every ``stride`` tokens,
    each scoring only its last ``stride`` tokens (the first window scores all of its own).
    """
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in (0, seq_len={seq_len}]; got {stride}")
    spans = []
    if stride == seq_len:
        spans = [(s, s + seq_len, s) for s in range(0, n_tokens - seq_len + 1, seq_len)]
    else:
        prev_end = 0
        for s in range(0, max(n_tokens - seq_len, 0) + 1, stride):
            end = min(s + seq_len, n_tokens)
            spans.append((s, end, max(prev_end, s)))
            prev_end = end
            if end == n_tokens:
                break
    if not spans:
        raise ValueError(f"text has {n_tokens} tokens, fewer than one window of {seq_len}")
    return spans[:max_windows] if max_windows else spans


@torch.no_grad()
def window_logits(model, ids: torch.Tensor, spans, batch_size: int, bos_id: int | None):
    """Yield ``(logits, targets)`` per batch of equal-length windows; logits[i, t] predicts targets[i, t]."""
    device = next(model.parameters()).device
    for k in range(0, len(spans), batch_size):
        chunk = spans[k : k + batch_size]
        x = torch.stack([ids[s:e] for s, e, _ in chunk])
        if bos_id is not None:
            x = torch.cat([torch.full((x.shape[0], 1), bos_id, dtype=x.dtype), x], 1)
        logits = model(x.to(device), use_cache=False).logits.float()
        # position j predicts token j+1; mask the targets that are context only
        targets = x[:, 1:].clone()
        off = 0 if bos_id is not None else 1
        for i, (s, _, first) in enumerate(chunk):
            n_ctx = first - s - off if first > s else 0
            targets[i, : max(n_ctx, 0)] = -100
        yield logits[:, :-1], targets.to(device)


def perplexity_of_ids(model, ids: torch.Tensor, seq_len: int, stride: int | None = None,
                      max_windows: int | None = None, batch_size: int = 4, bos_id: int | None = None
                      ) -> PerplexityResult:
    spans = window_spans(ids.numel(), seq_len, stride, max_windows)
    if stride and stride != seq_len and len({e - s for s, e, _ in spans}) > 1:
        batch_size = 1  # the last sliding window may be shorter
    total, count = 0.0, 0
    for logits, targets in window_logits(model, ids, spans, batch_size, bos_id):
        mask = targets != -100
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
                                       ignore_index=-100))
        count += int(mask.sum())
    return PerplexityResult(math.exp(total / count), total / count, count, len(spans), seq_len, stride or seq_len,
                            bos_id is not None)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def perplexity(model, tokenizer, text: str, seq_len: int = 2048, max_windows: int | None = None,
               batch_size: int = 4, bos: bool = False, stride: int | None = None) -> PerplexityResult:
    return perplexity_of_ids(model, tokenize(tokenizer, text), seq_len, stride, max_windows, batch_size,
                             tokenizer.bos_token_id if bos else None)
