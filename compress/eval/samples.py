"""Sample generations: does the compressed model still write? (issue 14). A few fixed prompts answered greedily by
the compressed model and by the dense one, side by side in the compression summary, the report and the model card.
An instruct model (a tokenizer with a chat template) answers chat prompts through its template (``chat.replies``);
any other model continues plain-text prompts."""
from __future__ import annotations

import torch

from .chat import PROMPTS, replies

TEXT_PROMPTS = ["Once upon a time, there was a", "The capital of France is", "Water boils at a temperature of",
                "The best way to learn a new language is"]
MAX_PROMPTS = min(len(PROMPTS), len(TEXT_PROMPTS))
MAX_NEW_TOKENS = 32


def prompts(tokenizer, n: int) -> list[str]:
    return (PROMPTS if getattr(tokenizer, "chat_template", None) else TEXT_PROMPTS)[:n]


@torch.no_grad()
def generate(model, tokenizer, n: int, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy replies (chat) or continuations (plain text) to the first ``n`` fixed prompts, as text."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.decode(r, skip_special_tokens=True).strip()
                for r in replies(model, tokenizer, prompts(tokenizer, n), max_new_tokens)]
    device = model.get_input_embeddings().weight.device
    out = []
    for p in prompts(tokenizer, n):
        x = tokenizer(p, return_tensors="pt")["input_ids"].to(device)
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, x.shape[1]:], skip_special_tokens=True).strip())
    return out


def side_by_side(tokenizer, compressed: list[str], dense: list[str] | None) -> dict:
    """The report's ``samples`` record: ``{"kind", "max_new_tokens", "rows": [{prompt, compressed, dense}]}``."""
    kind = "chat" if getattr(tokenizer, "chat_template", None) else "text"
    rows = [{"prompt": p, "compressed": c, **({"dense": dense[i]} if dense is not None else {})}
            for i, (p, c) in enumerate(zip(prompts(tokenizer, len(compressed)), compressed))]
    return {"kind": kind, "greedy": True, "max_new_tokens": MAX_NEW_TOKENS, "rows": rows}


def samples_table(samples: dict):
    from rich.table import Table

    table = Table(title=f"sample generations ({samples['kind']}, greedy, {samples['max_new_tokens']} new tokens)")
    table.add_column("prompt")
    table.add_column("compressed")
    dense = any("dense" in r for r in samples["rows"])
    if dense:
        table.add_column("dense")
    for r in samples["rows"]:
        table.add_row(r["prompt"], r["compressed"] or "(empty)", *([r.get("dense") or "(empty)"] if dense else []))
    return table
