"""Paper-style perplexity (the GPTQ / SVD-LLM protocol).

Join the rows with "\\n\\n", tokenize once without special tokens, cut into non-overlapping windows of ``seq_len``
tokens (the last partial window is dropped), score every token of every window but the first of each window, and
report ``exp(mean token NLL)`` over all scored tokens. With ``bos=True`` a BOS token is prepended to each window
and the window's first real token is scored too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``(n, seq_len)`` windows of a 1-D token tensor; the trailing partial window is dropped."""
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity_of_ids(model, win: torch.Tensor, batch_size: int = 4, bos_id: int | None = None) -> PerplexityResult:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, win.shape[0], batch_size):
        x = win[s : s + batch_size]
        if bos_id is not None:
            x = torch.cat([torch.full((x.shape[0], 1), bos_id, dtype=x.dtype), x], 1)
        logits = model(x.to(device), use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1).to(device),
                              reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return PerplexityResult(math.exp(total / count), total / count, count, win.shape[0], win.shape[1])


def perplexity(model, tokenizer, text: str, seq_len: int = 2048, max_windows: int | None = None,
               batch_size: int = 4, bos: bool = False) -> PerplexityResult:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    return perplexity_of_ids(model, windows(ids, seq_len, max_windows), batch_size,
                             tokenizer.bos_token_id if bos else None)
