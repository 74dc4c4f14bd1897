"""The checkable answer score of ``lrc eval --chat`` (compress/eval/answers.py): the checker's rules on hand-written
replies, the bundled set (large enough, each item answerable by its own answers, no prompt echo counted), its absence
from every text lrc ships for calibration or training, and an end-to-end run on a tiny model with a chat template."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from compress.eval import chat as chat_module
from compress.eval.answers import ANSWERS_FILE, answer_eval, check, load_items, normalise
from compress.eval.chat import PROMPTS, chat_eval
from compress.eval.run import answers_line, results_tables
from compress.selfgen import INSTRUCTIONS, QUESTIONS

from conftest import ROOT, SHARED, needs_shared

TEMPLATE = ("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>{% endif %}")
WIKI = SHARED / "data" / "calib" / "wiki_passages.jsonl"
COLOURS = {"prompt": "Name two primary colours.", "kind": "name_two", "answers": ["red", "blue", "yellow"], "need": 2}
SEASONS = {"prompt": "Name two seasons.", "kind": "name_two", "answers": ["spring", ["autumn", "fall"]], "need": 2}


def item(prompt: str, answers: list, **extra) -> dict:
    return {"prompt": prompt, "kind": "test", "answers": answers, **extra}


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def test_normalise_accents_punctuation_and_number_words():
    assert normalise("¡Adiós, Señor!") == ["adios", "senor"]
    assert normalise("Twenty-four hours; 1,000 grams, a thousand and one hundred") == ["24", "hours", "1000", "grams",
                                                                                  "1000", "and", "100"]
    assert normalise("two, three, four") == ["2", "3", "4"]  # a list of numbers is not one number
    assert normalise("one of the planets, 2.5 kg") == ["one", "of", "the", "planets", "2.5", "kg"]


@pytest.mark.parametrize("reply, correct", [
    ("The capital city of Japan is Tokyo.", True),
    ("TOKYO!", True),
    ("The capital city of Japan is Kyoto.", False),
    ("Tokyoites love it.", False),  # whole words only
    ("", False),
])
def test_single_answers(reply, correct):
    assert check(item("What is the capital city of Japan?", ["tokyo"]), reply)["correct"] is correct


@pytest.mark.parametrize("reply, correct", [
    ("A dog has four legs.", True),
    ("Dogs have 4 legs.", True),
    ("3 or maybe 4.", False),  # the first number stated counts
    ("Four-legged, yes: 4.", True),
    ("Dogs have legs.", False),
])
def test_numeric_answers_first_number_counts(reply, correct):
    assert check(item("How many legs does a dog have?", ["4"]), reply)["correct"] is correct


def test_numbers_from_the_prompt_are_skipped_and_formats_agree():
    sum_item = item("What is 3 + 4?", ["7"])
    assert check(sum_item, "3 + 4 = 7")["correct"] and check(sum_item, "3 plus 4 is seven.")["correct"]
    assert not check(sum_item, "3 + 4 = 8, or 7")["correct"]
    grams = item("How many grams are in a kilogram?", ["1000"])
    for reply in ("1,000 grams.", "There are a thousand grams.", "One thousand."):
        assert check(grams, reply)["correct"], reply
    assert not check(grams, "100 grams.")["correct"]


def test_accents_both_ways():
    assert check(item("Spanish for 'goodbye'?", ["adios"]), "¡Adiós!")["correct"]
    assert check(item("Spanish for 'yes'?", ["sí"]), "Si, claro.")["correct"]
    assert check(item("French for 'coffee'?", ["café"]), "It is CAFE.")["correct"]


def test_name_two_counts_distinct_valid_items():
    assert check(COLOURS, "Red and blue.") == {"correct": True, "found": ["red", "blue"]}
    assert check(COLOURS, "Yellows and blues.")["correct"]  # plurals
    assert check(COLOURS, "Red, green and blue.")["correct"]  # an extra wrong item is not penalised
    partial = check(COLOURS, "Red and green.")
    assert not partial["correct"] and partial["found"] == ["red"]
    assert not check(COLOURS, "Red, red and RED.")["correct"]  # the same item twice counts once
    assert not check(SEASONS, "Autumn, also called fall.")["correct"]  # alternatives of one item count once
    assert check(SEASONS, "Fall and spring.")["found"] == ["spring", "autumn"]


def test_wrong_answers_named_first_make_a_reply_wrong():
    planet = item("Largest planet?", ["jupiter"], wrong=["saturn", "earth"])
    assert check(planet, "Jupiter, eleven times wider than Earth.")["correct"]
    verdict = check(planet, "Saturn, but actually Jupiter.")
    assert not verdict["correct"] and verdict["wrong"] == ["saturn"]


def test_regular_expression_answers():
    colour = item("What colour is grass?", ["re:\\bgreen(ish)?\\b"])
    assert check(colour, "Greenish.")["correct"] and not check(colour, "Blue.")["correct"]


def test_the_bundled_set():
    items = load_items()
    assert len(items) >= 40 and len({i["prompt"] for i in items}) == len(items)
    assert {"capital", "arithmetic", "conversion", "translation", "name_two", "fact"} <= {i["kind"] for i in items}
    for it in items:
        assert set(it) <= {"prompt", "kind", "answers", "need", "wrong"} and it["answers"], it
        firsts = [a if isinstance(a, str) else a[0] for a in it["answers"]]
        assert len(firsts) >= it["need"], it
        assert check(it, "The answer: " + ", ".join(firsts[:it["need"]]) + ".")["correct"], it
        assert not check(it, it["prompt"])["correct"], it  # echoing the question is not an answer
        assert not check(it, "")["correct"], it
    assert sum(i["need"] == 2 for i in items) >= 5


def shipped_texts() -> dict[str, str]:
    """Every text lrc ships that calibration or training reads: calib/ sets, the package's data and source files
    (selfgen's user turns, finetune, the chat prompts), the answer set's own files excepted."""
    own = {ANSWERS_FILE.resolve(), Path(chat_module.__file__).with_name("answers.py").resolve()}
    files = [p for p in sorted((ROOT / "calib").rglob("*")) + sorted((ROOT / "compress").rglob("*"))
             if p.suffix in (".yaml", ".yml", ".txt", ".jsonl", ".json", ".py") and p.resolve() not in own]
    texts = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8").lower() for p in files}
    texts.update({"chat PROMPTS": "\n".join(PROMPTS).lower(), "selfgen INSTRUCTIONS": "\n".join(INSTRUCTIONS).lower()})
    return texts


def test_no_answer_prompt_in_any_shipped_text():
    texts = shipped_texts()
    assert "calib/wikitext2.yaml" in texts and "compress/selfgen.py" in texts and "compress/finetune/data.py" in texts
    for it in load_items():
        prompt = it["prompt"].lower()
        assert not [name for name, text in texts.items() if prompt in text], it["prompt"]


def test_selfgen_and_chat_prompts_share_nothing_with_the_set():
    answer_prompts = [i["prompt"].lower() for i in load_items()]
    for shipped in INSTRUCTIONS + QUESTIONS + PROMPTS:
        s = shipped.lower()
        assert not [p for p in answer_prompts if p in s or s in p], shipped


FRAME = set("what is the a an of in on for how many are there does do you say word name two 2 our one which city "
            "have has".split())


def test_selfgen_questions_ask_about_other_things():
    """The bundled short questions (``selfgen_prompts: questions``) are of the same kinds as the set's, never about
    the same thing: no item's content words (its prompt without the question frame) all occur in one question
    ("capital … japan", "7 … 5", "spanish … hello", "primary colours")."""
    def about(question: str) -> list[str]:
        words = set(normalise(question))
        return [it["prompt"] for it in load_items() if set(normalise(it["prompt"])) - FRAME <= words]

    assert all(set(normalise(it["prompt"])) - FRAME for it in load_items())
    # the check catches paraphrases of an item
    assert about("What is the capital of Japan?") and about("What is 4 + 3?") and about("Which days make the weekend?")
    assert not [(q, about(q)) for q in QUESTIONS if about(q)]


@needs_shared(WIKI)
def test_no_answer_prompt_in_the_shared_calibration_passages():
    text = "\n".join(json.loads(line).get("text", "") for line in WIKI.read_text(encoding="utf-8").splitlines()
                     if line.strip()).lower()
    assert not [i["prompt"] for i in load_items() if i["prompt"].lower() in text]


def test_answer_eval_end_to_end(tiny_model_dir, chat_tokenizer, monkeypatch):
    """Against itself (one item of each kind, to stay fast): the same score both sides and zero KL, with the dense
    replies generated once."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    calls = []
    real = chat_module.replies
    monkeypatch.setattr(chat_module, "replies", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    items = list({i["kind"]: i for i in load_items()}.values())
    out = answer_eval(model, chat_tokenizer, model, max_new_tokens=4, items=items)
    assert len(calls) == 2 and out["items"] == len(items) == len(out["samples"]) and out["max_new_tokens"] == 4
    assert out["answer_score"] == out["reference_answer_score"] == out["correct"] / len(items)
    assert out["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert set(out["by_kind"]) == {i["kind"] for i in items}
    assert sum(k["items"] for k in out["by_kind"].values()) == len(items)
    s = out["samples"][0]
    assert {"prompt", "kind", "reply", "correct", "found", "reference", "reference_correct"} <= set(s)
    assert s["reply"] == s["reference"] and s["correct"] == s["reference_correct"]


def test_scores_reach_the_output_and_the_printed_table(tiny_model_dir, chat_tokenizer, monkeypatch):
    """Replies that answer every item score 1, nonsense from the reference scores 0; ``chat_eval`` with its fixed
    prompts carries the result and ``lrc eval`` prints "answers correct: X/N (dense Y/N)"."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2")).eval()
    items = load_items()[:6]
    good = {i["prompt"]: " ".join(a if isinstance(a, str) else a[0] for a in i["answers"]) for i in items}

    def fake(m, tok, prompts, max_new_tokens=64, cache=False):
        text = [good.get(p, "") if m is model else "zzz" for p in prompts]
        return [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in text]

    monkeypatch.setattr(chat_module, "replies", fake)
    monkeypatch.setattr("compress.eval.answers.load_items", lambda: items)
    out = chat_eval(model, chat_tokenizer, other)
    assert {"prompts", "non_empty", "mean_kl", "reference_non_empty", "samples", "answers"} <= set(out)
    ans = out["answers"]
    assert (ans["answer_score"], ans["reference_answer_score"], ans["correct"]) == (1.0, 0.0, 6)
    assert ans["mean_kl"] > 0 and answers_line(ans) == "answers correct: 6/6 (dense 0/6)"
    assert "answers" not in chat_eval(model, chat_tokenizer, other, prompts=PROMPTS[:1])
    from rich.console import Console

    console = Console(record=True, width=200)
    for table in results_tables({"chat": out}, "tiny"):
        console.print(table)
    assert "answers correct: 6/6 (dense 0/6)" in console.export_text()
