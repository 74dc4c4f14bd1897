"""Does an instruct model still answer? (issue 14). Twenty fixed chat prompts, written for lrc and found in no
calibration or training set it ships or reads, are answered greedily through the tokenizer's chat template (64 new
tokens). Reported: the fraction of non-empty replies (after removing special tokens and whitespace) and, against a
dense reference, the mean KL(dense ‖ model) over the tokens of the dense model's own replies (teacher-forced: both
models read the prompt and the dense reply; every reply token, its end-of-turn included, is one position). With
the fixed prompts, also the checkable answer score of ``answers.py`` under ``"answers"``: the fraction of the short
prompts with known answers (capitals, arithmetic, ...) answered correctly, the dense model's beside it."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from ..errors import LrcError
from .kl import kl_rows

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain in one paragraph why the sky looks blue.",
    "Write a haiku about a rainy Monday morning.",
    "How many legs does a spider have?",
    "Translate 'good morning, my friend' into Spanish.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery that sells sourdough bread.",
    "Summarize the story of Cinderella in two sentences.",
    "What should I pack for a weekend hiking trip?",
    "Why do we need to sleep?",
    "Write a short thank-you note to a neighbour who watered my plants.",
    "What is 15 multiplied by 4?",
    "Name three animals that live in the ocean.",
    "How do I boil an egg so the yolk stays soft?",
    "What does a librarian do during a typical day?",
    "Give me a simple recipe for a green salad.",
    "Explain what a computer keyboard is used for.",
    "What are two benefits of riding a bicycle to work?",
    "Describe the colour orange to someone who has never seen it.",
]


def _prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise LrcError("chat evaluation needs a tokenizer with a chat template (an instruct model)")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for p in prompts]


def _reply_cache(model, ids: list[list[int]], max_new_tokens: int, eos: set[int]) -> Path:
    """Where greedy replies of ``model`` (its weights' fingerprint) to these exact prompt tokens are cached: greedy
    decoding is a function of the weights, the prompt, the stopping rule, the dtype and the device kind, all in the
    key (with transformers' version), so a dense reference measured once serves every later comparison."""
    import transformers

    from ..engine.cache import model_fingerprint
    from ..models import cache_root

    key = json.dumps([ids, max_new_tokens, sorted(eos), str(model.dtype),
                      model.get_input_embeddings().weight.device.type, transformers.__version__])
    return (cache_root() / "replies" / model_fingerprint(model)[:24]
            / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json")


@torch.no_grad()
def replies(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, cache: bool = False) -> list[list[int]]:
    """Greedy replies (token ids up to and including the first end token, else ``max_new_tokens``), one prompt at a
    time (no padding: exactly what a user's single chat turn gets). ``cache``: reuse (and store) the replies of these
    exact weights under ``$LRC_CACHE/replies`` (``_reply_cache``)."""
    device = model.get_input_embeddings().weight.device
    eos = {t for t in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if t is not None}
    eos = set().union(*(e if isinstance(e, (list, tuple)) else [e] for e in eos))
    prompt_ids = _prompt_ids(tokenizer, prompts)
    path = _reply_cache(model, prompt_ids, max_new_tokens, eos) if cache else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids], device=device)
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)[0, len(ids):].tolist()
        end = next((k + 1 for k, t in enumerate(gen) if t in eos), len(gen))
        out.append(gen[:end])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, path)
    return out


@torch.no_grad()
def reply_kl(model, reference, tokenizer, prompts: list[str], reference_replies: list[list[int]]) -> float:
    """Mean KL(reference ‖ model) per reply token, teacher-forced on the reference's replies."""
    total, count = 0.0, 0
    for ids, reply in zip(_prompt_ids(tokenizer, prompts), reference_replies):
        if not reply:
            continue
        seq = torch.tensor([ids + reply])
        positions = slice(len(ids) - 1, len(ids) - 1 + len(reply))  # the logits that predict the reply tokens
        total += float(kl_rows(reference(seq.to(reference.device)).logits[0, positions],
                               model(seq.to(model.device)).logits[0, positions]).sum())
        count += len(reply)
    return total / max(count, 1)


def chat_eval(model, tokenizer, reference=None, prompts: list[str] | None = None, max_new_tokens: int = 64,
              answers: bool | None = None, cache: bool = False) -> dict:
    """``{"prompts", "non_empty", "mean_kl" (with a reference), "samples": [{prompt, reply, reference}]}``, and with
    ``answers`` the answer score (``answers.answer_eval``, its own prompts and 48 new tokens) under ``"answers"``
    (None: when ``prompts`` is the fixed set, as ``lrc eval --chat`` runs it). ``cache``: reuse replies already
    generated by the same weights (``replies``), e.g. the dense reference's across comparisons."""
    answers = prompts is None if answers is None else answers
    prompts = prompts or PROMPTS
    mine = replies(model, tokenizer, prompts, max_new_tokens, cache)
    text = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in mine]
    out = {"prompts": len(prompts), "max_new_tokens": max_new_tokens,
           "non_empty": sum(bool(t) for t in text) / len(prompts)}
    samples = [{"prompt": p, "reply": t} for p, t in zip(prompts, text)]
    if reference is not None:
        ref = replies(reference, tokenizer, prompts, max_new_tokens, cache)
        out["mean_kl"] = reply_kl(model, reference, tokenizer, prompts, ref)
        out["reference_non_empty"] = sum(bool(tokenizer.decode(r, skip_special_tokens=True).strip())
                                         for r in ref) / len(prompts)
        for s, r in zip(samples, ref):
            s["reference"] = tokenizer.decode(r, skip_special_tokens=True).strip()
    out["samples"] = samples
    if answers:
        from .answers import answer_eval

        out["answers"] = answer_eval(model, tokenizer, reference, cache=cache)
    return out
