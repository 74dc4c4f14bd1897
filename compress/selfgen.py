"""Self-generated calibration: text sampled from the model itself (ASVD offers it; it needs no data at all).

Plain sequences start at BOS and sample 255 tokens with EOS excluded. That is text an instruct model never sees in
use (issue 14): the README's main job compressed on it answered chat prompts with an immediate end of turn. So for
a tokenizer with a chat template, a share of the sequences (``calibration.selfgen_chat``; all of them by default)
are chat-formatted:
- a user turn from ``INSTRUCTIONS`` (or the set ``calibration.selfgen_prompts`` names: ``QUESTIONS``, short
  questions with one-line answers, both, or the user's own file), drawn with the seeded generator, is rendered by the
  chat template and fed in as is;
- the model samples its own reply, with the end of turn allowed;
- at the end of turn the template's separator and the next conversation follow, packed until the window is full.

Both kinds advance together, one token a step, through one KV cache (``sampling.preallocated_cache``); forced tokens
(the prompts) replace the draw of their row. Draws are exact (``sampling.sample_categorical``).
"""
from __future__ import annotations

from collections import deque

import torch

from .progress import active

INSTRUCTIONS = [  # user turns for chat-formatted calibration; none is among eval/chat.py's prompts
    "Tell me a short story about a lighthouse keeper.", "What are the main causes of inflation?",
    "Write a Python function that reverses a string.", "How do vaccines train the immune system?",
    "Give me a packing list for a beach holiday.", "Explain the rules of chess in simple terms.",
    "What is photosynthesis?", "Write a polite email asking for a deadline extension.",
    "List five healthy breakfast ideas.", "Why is the ocean salty?",
    "Describe the water cycle for a ten-year-old.", "What is the Pythagorean theorem?",
    "How can I improve my public speaking?", "Write a limerick about a cat who loves jazz.",
    "What happened during the French Revolution?", "Compare cats and dogs as pets.",
    "How does a refrigerator keep food cold?", "Give me a workout plan for beginners.",
    "Explain what an API is.", "What are black holes?", "Suggest a weekend itinerary for Rome.",
    "How do I make a cup of green tea?", "What is machine learning?", "Write a poem about autumn leaves.",
    "How do bees make honey?", "What is the difference between a virus and a bacterium?",
    "Explain compound interest with an example.", "Why do leaves change colour in the fall?",
    "Write a SQL query that counts orders per customer.", "What makes a good team leader?",
    "How do airplanes stay in the air?", "Recommend three classic novels and say why.",
    "What is the tallest mountain in Africa?", "Explain recursion to a new programmer.",
    "How do I care for a houseplant?", "What is democracy?", "Write a dialogue between a robot and a child.",
    "How does the moon affect the tides?", "What are renewable energy sources?",
    "Give me tips for a job interview.",
]


QUESTIONS = [  # short questions with one-line answers (``selfgen_prompts: questions``); none asks what
    # eval/answers.jsonl asks (tests/test_answers.py checks that no item's subject is among them)
    "What is the capital of Australia?", "What is the capital of Brazil?", "What is the capital of Kenya?",
    "What is the capital of Norway?", "What is the capital of Argentina?", "What is the capital of India?",
    "What is the capital of Greece?", "What is the capital of Mexico?", "What is the capital of Portugal?",
    "What is 6 + 9?", "What is 15 - 7?", "What is 3 x 6?", "What is 18 / 3?", "What is double 9?",
    "What is 11 + 13?", "What is 9 - 2?", "What is 2 x 8?", "What is a third of 12?",
    "How many days are in a leap year?", "How many weeks are in a year?", "How many inches are in a foot?",
    "How many years are in a century?", "How many sides does a hexagon have?", "How many zeros are in a million?",
    "What is the German word for 'dog'?", "What is the Italian word for 'goodbye'?",
    "How do you say 'good night' in Spanish?", "What is the French word for 'house'?",
    "What is the Spanish word for 'friend'?", "What is the German word for 'bread'?",
    "Name two kinds of trees.", "Name two vegetables.", "Name two sports played with a ball.",
    "Name two countries in South America.", "Name two metals.", "Name two fruits that are yellow.",
    "What is the boiling point of water in Celsius?", "Who wrote Romeo and Juliet?",
    "What gas do plants take in from the air?", "What is the chemical symbol for gold?",
    "How many strings does a standard guitar have?", "What is the smallest prime number?",
    "Who painted the Mona Lisa?", "What is the tallest animal in the world?", "What is the largest mammal?",
    "What language is spoken in Brazil?", "What is the square root of 81?", "What is the opposite of early?",
    "What do you call frozen water?", "Which organ pumps blood through the body?",
]
PROMPT_SETS = {"instructions": INSTRUCTIONS, "questions": QUESTIONS, "instructions+questions": INSTRUCTIONS + QUESTIONS}


def load_prompts(spec: str | None, field: str = "calibration.selfgen_prompts") -> list[str]:
    """The user turns chat-formatted selfgen draws from: a bundled set by name (``PROMPT_SETS``; None:
    ``instructions``), or a local file, one turn a line (``.txt``) or a ``prompt`` / ``text`` field a line
    (``.jsonl``). Raises ``LrcError`` naming ``field`` and the file when it cannot be read or holds no turn."""
    import json
    from pathlib import Path

    from .errors import LrcError

    if spec is None or spec in PROMPT_SETS:
        return list(PROMPT_SETS[spec or "instructions"])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LrcError(f"{field}: {spec}: neither a bundled set ({', '.join(PROMPT_SETS)}) "
                       f"nor a file")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if path.suffix == ".jsonl":
            rows = [json.loads(ln) for ln in lines]
            lines = [str(r.get("prompt") or r.get("text") or "").strip() for r in rows]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise LrcError(f"{field}: {path}: cannot read user turns ({e})") from e
    turns = [t for t in lines if t]
    if not turns:
        raise LrcError(f"{field}: {path}: no user turn in it")
    return turns


class _Chat:
    """The token streams of chat-formatted rows: a prompt to feed, then the model's reply until end of turn."""

    def __init__(self, tokenizer, generator: torch.Generator, prompts: list[str] | None = None):
        self.tok, self.g = tokenizer, generator
        self.prompts = prompts or INSTRUCTIONS
        self.eos = tokenizer.eos_token_id
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "U"},
                                                  {"role": "assistant", "content": "XYZ"}], tokenize=False)
        end = rendered.rfind("XYZ") + 3
        tail = rendered[end:]
        if tokenizer.eos_token and tail.startswith(tokenizer.eos_token):
            tail = tail[len(tokenizer.eos_token):]
        self.separator = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []

    def prompt(self) -> list[int]:
        text = self.prompts[int(torch.randint(len(self.prompts), (1,), generator=self.g))]
        return list(self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))


def chat_rows(tokenizer, samples: int, share: float | None) -> int:
    """How many of ``samples`` rows are chat-formatted: ``share`` of them (None: all when the tokenizer has a chat
    template and an EOS token, else none)."""
    if not getattr(tokenizer, "chat_template", None) or tokenizer.eos_token_id is None:
        return 0
    return samples if share is None else round(share * samples)


def selfgen(model, tokenizer, cfg, batch_size: int, max_tokens: int = 2**15) -> torch.Tensor:
    """``(samples, seq_len)`` token ids sampled from ``model`` (seeded by ``cfg.seed``): the first
    ``chat_rows(...)`` rows chat-formatted, the rest plain (BOS, then EOS excluded). As many rows per chunk as fit
    ``max_tokens`` cached positions."""
    from .sampling import cache_kwargs, preallocated_cache, sample_categorical

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    g = torch.Generator().manual_seed(cfg.seed)
    n_chat = chat_rows(tokenizer, cfg.samples, getattr(cfg, "selfgen_chat", None))
    chat = _Chat(tokenizer, g, load_prompts(getattr(cfg, "selfgen_prompts", None))) if n_chat else None
    chunk = max(1, min(cfg.samples, max_tokens // cfg.seq_len))
    device = model.get_input_embeddings().weight.device
    out = []
    with torch.inference_mode():
        for i in range(0, cfg.samples, chunk):
            n = min(chunk, cfg.samples - i)
            seq = torch.full((n, cfg.seq_len), start, dtype=torch.long)
            queues = [deque(chat.prompt()) if i + r < n_chat else None for r in range(n)]
            for r, q in enumerate(queues):
                if q is not None:
                    seq[r, 0] = q.popleft()
            banned = torch.tensor([q is None for q in queues])  # plain rows never draw EOS
            cache, cur = preallocated_cache(cfg.seq_len), seq[:, :1].to(device)
            kw = cache_kwargs(model, cache)
            for t in range(1, cfg.seq_len):
                if t % 32 == 1:  # minutes on a large model: keep the log alive
                    active().phase(f"selfgen {i + n}/{cfg.samples} samples, token {t}/{cfg.seq_len}")
                logits = model(input_ids=cur, **kw, use_cache=True, logits_to_keep=1).logits
                drawn = sample_categorical(logits[:, -1], g, eos, None if banned.all() else banned).cpu()
                for r, q in enumerate(queues):
                    if q is None:
                        continue
                    if q:
                        drawn[r] = q.popleft()
                    elif int(drawn[r]) == eos:  # end of turn: the next conversation follows
                        q.extend(chat.separator + chat.prompt())
                seq[:, t] = drawn
                cur = seq[:, t: t + 1].to(device)
            out.append(seq)
    return torch.cat(out)
