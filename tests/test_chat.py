"""``lrc eval --chat`` (compress/eval/chat.py): greedy replies through the chat template, the fraction of non-empty
ones, and the KL to a reference over the reference's own reply tokens (zero against itself, positive against another
model, equal to a direct teacher-forced computation)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from compress.errors import LrcError
from compress.eval.chat import PROMPTS, chat_eval, replies

TEMPLATE = ("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>{% endif %}")


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def test_chat_eval_against_itself_and_another_model(tiny_model_dir, chat_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2")).eval()
    prompts = PROMPTS[:3]
    same = chat_eval(model, chat_tokenizer, model, prompts, max_new_tokens=8)
    assert same["mean_kl"] == pytest.approx(0.0, abs=1e-6) and same["prompts"] == 3
    assert 0 <= same["non_empty"] <= 1 and [s["reply"] for s in same["samples"]] == [s["reference"]
                                                                                     for s in same["samples"]]
    diff = chat_eval(other, chat_tokenizer, model, prompts, max_new_tokens=8)
    ids = chat_tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    reply = replies(model, chat_tokenizer, prompts[:1], 8)[0]
    seq = torch.tensor([ids + reply])
    with torch.no_grad():
        p = F.log_softmax(model(seq).logits[0, len(ids) - 1:len(ids) - 1 + len(reply)], -1)
        q = F.log_softmax(other(seq).logits[0, len(ids) - 1:len(ids) - 1 + len(reply)], -1)
    first = float((p.exp() * (p - q)).sum() / len(reply))
    assert diff["mean_kl"] > 0 and first > 0
    one = chat_eval(other, chat_tokenizer, model, prompts[:1], max_new_tokens=8)
    assert one["mean_kl"] == pytest.approx(first, rel=1e-5)


def test_chat_needs_a_chat_template(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    with pytest.raises(LrcError, match="chat template"):
        chat_eval(model, tokenizer, prompts=PROMPTS[:1])


def test_replies_cached_per_weights(tiny_model_dir, chat_tokenizer, monkeypatch, tmp_path):
    """A second call on the same weights reads the cache (generation is never called), other weights or another
    token budget generate anew, and the cached replies equal the generated ones."""
    monkeypatch.setenv("LRC_CACHE", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    prompts = PROMPTS[:2]
    first = replies(model, chat_tokenizer, prompts, 6, cache=True)
    assert first == replies(model, chat_tokenizer, prompts, 6) and len(list(tmp_path.rglob("*.json"))) == 1
    calls = []
    original = type(model).generate
    monkeypatch.setattr(type(model), "generate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    assert replies(model, chat_tokenizer, prompts, 6, cache=True) == first and not calls
    replies(model, chat_tokenizer, prompts, 5, cache=True)
    assert len(calls) == 2
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    replies(model, chat_tokenizer, prompts, 6, cache=True)
    assert len(calls) == 4 and len(list(tmp_path.rglob("*.json"))) == 3
