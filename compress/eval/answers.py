"""A checkable answer score for ``lrc eval --chat`` (issue 24): short prompts with known answers (capitals, small
arithmetic, unit conversions, one-word translations, "name two …", simple facts), bundled in ``answers.jsonl`` next
to this module and found in no calibration or training text lrc ships. Each is answered greedily through the chat
template (``chat.replies``, 48 new tokens by default); ``answer_score`` is the fraction answered correctly, and
with a dense reference ``reference_answer_score`` is the dense model's, on replies generated once (they also give
``mean_kl``, the KL over the dense replies' tokens, as in ``chat.py``).

Set format, one JSON object a line: ``prompt``; ``kind`` (the category); ``answers``: accepted answers, each a
string or a list of alternative spellings of one answer (``["autumn", "fall"]``), a string starting with ``re:``
being a regular expression searched in the normalised reply; ``need`` (default 1): how many distinct answers the
reply must name ("name two …" items list every valid item and need 2); ``wrong`` (optional): tempting wrong answers
(a reply naming one of them before any right answer is incorrect).

Checking rules:
- Normalisation (reply and answers alike): Unicode accents removed (``é`` → ``e``), lower case, thousands
  separators dropped (``1,000`` → ``1000``), then only words (``[a-z]+``) and numbers (``12``, ``2.5``) are kept,
  so punctuation and spacing never matter. Number words become digits: ``four`` → ``4``, ``twenty-four`` → ``24``,
  ``one hundred`` / ``a hundred`` → ``100``, ``a thousand`` → ``1000``; a run of number words is one number only
  where English grammar allows it (``two, three`` stays 2 and 3); ``one`` on its own stays a word (it is mostly a
  pronoun, "one of the …").
- An answer matches when its words occur as consecutive whole words of the reply (word boundaries: ``rome`` does
  not match ``romeo``); its last word may carry a plural ``s``/``es`` (``apple`` matches ``apples``).
- A reply is correct when it matches at least ``need`` distinct answers (alternatives of one answer count once;
  wrong extra items are not penalised: "red, green and blue" names two primary colours).
- With ``wrong`` answers listed, the first of the right and wrong answers that the reply names must be a right one
  ("Neptune, but actually Jupiter" is wrong for the largest planet; "Jupiter, 11 times wider than Earth" is right).
- Numeric items (``need`` 1, every answer a number): the first number in the reply that is not in the prompt must
  be an accepted answer, so "3 + 4 = 7" is right for "What is 3 + 4?" but "8, or maybe 7" is not.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import defaultdict
from pathlib import Path

ANSWERS_FILE = Path(__file__).with_name("answers.jsonl")

_UNITS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                     "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
_SCALES = {"thousand": 1000, "million": 10**6}
_NUMBER = re.compile(r"\d+(?:\.\d+)?$")


def load_items(path: str | Path = ANSWERS_FILE) -> list[dict]:
    """The answer set: one dict per non-blank line of ``path`` (``need`` filled in, default 1)."""
    items = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"need": 1, **item} for item in items]


def _words(text: str) -> list[str]:
    """Accent-free, lower-case words and numbers of ``text`` (number words not yet converted)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return re.findall(r"\d+(?:\.\d+)?|[a-z]+", text)


def _kind_of(word: str) -> str | None:
    """The grammatical class of a number word (None: not one)."""
    if word in _UNITS:
        return "unit" if _UNITS[word] < 10 else "teen"
    if word in _TENS:
        return "tens"
    return "hundred" if word == "hundred" else "scale" if word in _SCALES else "a" if word == "a" else None


# which class may follow which inside one spelled number ("twenty four", "two hundred five", "a thousand"); a run
# ends where the next word cannot follow, so "two, three" stays two numbers and "three twenty" is 3 and 20
_FOLLOWS = {None: {"unit", "teen", "tens", "a"}, "a": {"hundred", "scale"}, "unit": {"hundred", "scale"},
            "teen": {"hundred", "scale"}, "tens": {"unit", "scale"}, "hundred": {"unit", "teen", "tens", "scale"},
            "scale": {"unit", "teen", "tens"}}


def _number_run(words: list[str], i: int) -> int:
    """The end of the spelled number starting at ``words[i]`` (``i`` itself when there is none: a lone ``a`` or
    ``one`` is a word)."""
    j, state = i, None
    while j < len(words) and _kind_of(words[j]) in _FOLLOWS[state]:
        state = _kind_of(words[j])
        j += 1
    return i if words[i:j] in ([], ["a"], ["one"]) else j


def _spelled_value(run: list[str]) -> int:
    """The value of a run of number words (``["twenty", "four"]`` → 24, ``["a", "thousand"]`` → 1000)."""
    total, current = 0, 0
    for w in run:
        if w == "hundred":
            current = max(current, 1) * 100
        elif w in _SCALES:
            total, current = total + max(current, 1) * _SCALES[w], 0
        else:
            current += _UNITS.get(w, _TENS.get(w, 0))
    return total + current


def normalise(text: str) -> list[str]:
    """The words of ``text`` as the checker compares them: accents removed, lower case, punctuation gone, number
    words as digits (``"Twenty-four hours!"`` → ``["24", "hours"]``)."""
    words, out, i = _words(text), [], 0
    while i < len(words):
        j = _number_run(words, i)
        out.append(str(_spelled_value(words[i:j])) if j > i else words[i])
        i = max(j, i + 1)
    return out


def _position(alternative: str, text: str) -> int | None:
    """Where ``alternative`` first occurs in the normalised ``text`` (words joined by single spaces), or None: a
    ``re:`` regular expression as written, else its normalised words as consecutive whole words of ``text``, the
    last one optionally plural."""
    if alternative.startswith("re:"):
        found = re.search(alternative[3:], text)
    else:
        words = normalise(alternative)
        if not words:
            return None
        body = " ".join([*map(re.escape, words[:-1]), re.escape(words[-1]) + "(?:s|es)?"])
        found = re.search(rf"(?<!\S){body}(?!\S)", text)
    return found.start() if found else None


def _first_position(answer: str | list[str], text: str) -> int | None:
    """The earliest position at which any alternative of ``answer`` occurs in ``text``, or None."""
    hits = [p for p in (_position(a, text) for a in _alternatives(answer)) if p is not None]
    return min(hits, default=None)


def _alternatives(answer: str | list[str]) -> list[str]:
    return [answer] if isinstance(answer, str) else list(answer)


def _numeric(item: dict) -> bool:
    """An item whose single required answer is a number (the first-new-number rule applies)."""
    alts = [a for ans in item["answers"] for a in _alternatives(ans)]
    return item.get("need", 1) == 1 and all(not a.startswith("re:") and _NUMBER.match(" ".join(normalise(a)) or "x")
                                            for a in alts)


def _first_new_number(reply: list[str], prompt: list[str]) -> str | None:
    """The first number of the reply that the prompt does not contain."""
    given = {w for w in prompt if _NUMBER.match(w)}
    return next((w for w in reply if _NUMBER.match(w) and w not in given), None)


def _before(position: int | None, limit: int) -> bool:
    return position is not None and position < limit


def check(item: dict, reply: str) -> dict:
    """``{"correct", "found"[, "wrong"]}``: whether ``reply`` answers ``item``, which of its answers it names (the
    first alternative of each) and, when one of the item's ``wrong`` answers comes before every right one, which."""
    words = normalise(reply)
    text = " ".join(words)
    if _numeric(item):
        first = _first_new_number(words, normalise(item["prompt"]))
        found = [alts[0] for alts in map(_alternatives, item["answers"])
                 if first is not None and any(normalise(a) == [first] for a in alts)]
        return {"correct": bool(found), "found": found}
    at = {_alternatives(a)[0]: _first_position(a, text) for a in item["answers"]}
    found = [a for a, p in at.items() if p is not None]
    first_right = min((p for p in at.values() if p is not None), default=len(text) + 1)
    wrong = [w for w in item.get("wrong", []) if _before(_first_position(w, text), first_right)]
    out = {"correct": len(found) >= item.get("need", 1) and not wrong, "found": found}
    if wrong:
        out["wrong"] = wrong
    return out


def _score(flags: list[bool]) -> float:
    return sum(flags) / max(len(flags), 1)


def _by_kind(items: list[dict], mine: list[bool], ref: list[bool] | None) -> dict:
    """Per category: items, correct, answer_score (and reference_correct, reference_answer_score)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for k, item in enumerate(items):
        groups[item["kind"]].append(k)
    out = {}
    for kind, ks in groups.items():
        right = [mine[k] for k in ks]
        out[kind] = {"items": len(ks), "correct": sum(right), "answer_score": _score(right)}
        if ref is not None:
            dense = [ref[k] for k in ks]
            out[kind].update(reference_correct=sum(dense), reference_answer_score=_score(dense))
    return out


def answer_eval(model, tokenizer, reference=None, max_new_tokens: int = 48, items: list[dict] | None = None,
                cache: bool = False) -> dict:
    """Answer the set greedily through the chat template and check every reply. Returns ``{"items",
    "max_new_tokens", "correct", "answer_score", "by_kind": {kind: {items, answer_score, …}}, "samples": [{prompt,
    kind, reply, correct, found, …}]}``; with a ``reference`` (dense model) also ``reference_correct``,
    ``reference_answer_score`` (per kind and per sample too) and ``mean_kl`` over the dense replies' tokens. The
    dense replies are generated once and serve both; ``cache``: reused across runs (``chat.replies``)."""
    from .chat import replies, reply_kl

    items = items if items is not None else load_items()
    prompts = [item["prompt"] for item in items]
    decode = (lambda r: tokenizer.decode(r, skip_special_tokens=True).strip())
    text = [decode(r) for r in replies(model, tokenizer, prompts, max_new_tokens, cache)]
    checks = [check(item, t) for item, t in zip(items, text)]
    mine = [c["correct"] for c in checks]
    samples = [{"prompt": item["prompt"], "kind": item["kind"], "reply": t, **c}
               for item, t, c in zip(items, text, checks)]
    out = {"items": len(items), "max_new_tokens": max_new_tokens, "correct": sum(mine), "answer_score": _score(mine)}
    ref = None
    if reference is not None:
        ref_ids = replies(reference, tokenizer, prompts, max_new_tokens, cache)
        ref_checks = [check(item, decode(r)) for item, r in zip(items, ref_ids)]
        ref = [c["correct"] for c in ref_checks]
        out.update(reference_correct=sum(ref), reference_answer_score=_score(ref),
                   mean_kl=reply_kl(model, reference, tokenizer, prompts, ref_ids))
        for s, r, c in zip(samples, ref_ids, ref_checks):
            s.update(reference=decode(r), reference_correct=c["correct"])
    out["by_kind"] = _by_kind(items, mine, ref)
    out["samples"] = samples
    return out
