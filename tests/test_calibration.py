"""Calibration sources: local files, named sets through the datasets hub code path (on local files), windows."""
import json

import pytest
import torch

from compress import calibration
from compress.calibration import calibration_tokens, windows_from_ids
from compress.errors import LrcError
from compress.recipe import CalibrationConfig


def test_windows_are_distinct_non_overlapping_and_seeded():
    ids = torch.arange(1000)
    w = windows_from_ids(ids, samples=5, seq_len=100, seed=0, source="x")
    assert w.shape == (5, 100)
    starts = w[:, 0].tolist()
    assert all(s % 100 == 0 for s in starts) and len(set(starts)) == 5
    assert torch.equal(w, windows_from_ids(ids, 5, 100, 0, "x"))
    assert not torch.equal(w, windows_from_ids(ids, 5, 100, 1, "x"))
    with pytest.raises(LrcError, match="too little for 11 samples"):
        windows_from_ids(ids, 11, 100, 0, "x")


def test_named_set_goes_through_datasets(monkeypatch, tmp_path, corpus_file, tokenizer):
    """A calib/ set definition is loaded with datasets.load_dataset, the code path used for hub ids; here the
    dataset is the local json builder so the test runs offline."""
    (tmp_path / "localset.yaml").write_text(
        f"description: test\npath: json\ndata_files: {corpus_file}\nsplit: train\ntext_field: text\n")
    monkeypatch.setattr(calibration, "CALIB_DIR", tmp_path)
    cfg = CalibrationConfig(dataset="localset", samples=4, seq_len=16)
    ids = calibration_tokens(None, tokenizer, cfg, tmp_path / "cache")
    assert ids.shape == (4, 16)
    local = calibration_tokens(None, tokenizer, CalibrationConfig(dataset=str(corpus_file), samples=4, seq_len=16),
                               tmp_path / "cache")
    assert torch.equal(ids, local)  # same rows, same tokens, same windows


def test_shipped_sets_are_well_formed():
    sets = calibration.named_sets()
    assert {"wikitext2", "c4", "ptb"} <= set(sets)
    for spec in sets.values():
        assert {"path", "split"} <= set(spec)
        assert "text_field" in spec or spec["format"] in ("arc",)


def test_unreachable_hub_set_is_one_line_error(monkeypatch, tokenizer, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LrcError, match="offline\\? pass a local .jsonl") as err:
        calibration_tokens(None, tokenizer, CalibrationConfig(dataset="wikitext2", samples=2, seq_len=8),
                           tmp_path / "cache")
    assert "\n" not in str(err.value)


def test_parquet_and_txt(tmp_path, tokenizer, corpus_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in corpus_file.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist([{"body": r["text"]} for r in rows]), tmp_path / "c.parquet")
    cfg = CalibrationConfig(dataset=str(tmp_path / "c.parquet"), samples=4, seq_len=16, text_field="body")
    assert calibration_tokens(None, tokenizer, cfg, tmp_path / "cache").shape == (4, 16)
    (tmp_path / "c.txt").write_text("\n\n".join(r["text"] for r in rows))
    cfg = CalibrationConfig(dataset=str(tmp_path / "c.txt"), samples=4, seq_len=16)
    assert calibration_tokens(None, tokenizer, cfg, tmp_path / "cache").shape == (4, 16)


def _arc_records(n=60):
    """ARC's own layout (the ../shared files) with made-up questions from the tiny tokenizer's words."""
    from conftest import make_corpus

    words = make_corpus(4 * n, seed=3)
    return [{"id": f"q{i}", "question": {"stem": words[4 * i], "choices": [
        {"text": words[4 * i + k], "label": "ABCD"[k - 1]} for k in (1, 2, 3)]}, "answerKey": "ABC"[i % 3]}
        for i in range(n)]


def test_arc_format_renders_question_and_correct_answer_in_both_layouts():
    rec = _arc_records(2)[1]
    text = calibration.arc_text(rec)
    assert text == f"Question: {rec['question']['stem']}\nAnswer: {rec['question']['choices'][1]['text']}"
    hub = {"question": rec["question"]["stem"], "answerKey": "B",
           "choices": {"text": [c["text"] for c in rec["question"]["choices"]], "label": ["A", "B", "C"]}}
    assert calibration.arc_text(hub) == text


def test_arc_file_is_detected_and_bad_fields_are_named(tmp_path, tokenizer, corpus_file):
    arc = tmp_path / "arc.jsonl"
    recs = _arc_records()
    arc.write_text("\n".join(json.dumps(r) for r in recs))
    rows = calibration.rows_from_file(arc, None)  # format auto: ARC-shaped records
    assert rows[0].startswith("Question: ") and "\nAnswer: " in rows[0]
    assert calibration.rows_from_file(arc, None, "arc") == rows
    with pytest.raises(LrcError, match="no field 'text'.*format: arc"):
        calibration.rows_from_file(arc, None, "text")
    with pytest.raises(LrcError, match="format arc needs 'question' and 'answerKey'"):
        calibration.rows_from_file(corpus_file, None, "arc")


def test_mix_takes_each_sources_share_of_the_windows(tmp_path, tokenizer, corpus_file):
    from compress.recipe import CalibrationSource

    arc = tmp_path / "arc.jsonl"
    arc.write_text("\n".join(json.dumps(r) for r in _arc_records(200)))
    cfg = CalibrationConfig(samples=8, seq_len=16, mix=[CalibrationSource(dataset=str(corpus_file), weight=3),
                                                        CalibrationSource(dataset=str(arc), weight=1)])
    ids = calibration_tokens(None, tokenizer, cfg, tmp_path / "cache")
    general = calibration_tokens(None, tokenizer, CalibrationConfig(dataset=str(corpus_file), samples=6, seq_len=16),
                                 tmp_path / "cache")
    task = calibration_tokens(None, tokenizer, CalibrationConfig(dataset=str(arc), samples=2, seq_len=16),
                              tmp_path / "cache")
    assert torch.equal(ids, torch.cat([general, task]))
    assert calibration.shares([1, 1], 7) == [4, 3] and calibration.shares([1, 100], 3) == [1, 2]
    assert sum(calibration.shares([0.2, 0.3, 0.5], 10)) == 10


def test_mix_rules():
    from compress.recipe import Recipe, parse_recipe

    base = {"stages": [{"method": "svd", "param_ratio": 0.5}]}
    with pytest.raises(LrcError, match="calibration: mix has 3 sources but only 2 samples"):
        parse_recipe({**base, "calibration": {"samples": 2, "mix": [{"dataset": "a.txt"}] * 3}})
    with pytest.raises(LrcError, match="selfgen cannot be part of a mix"):
        parse_recipe({**base, "calibration": {"mix": [{"dataset": "selfgen"}, {"dataset": "a.txt"}]}})
    with pytest.raises(LrcError, match="calibration.mix\\[0\\].weight"):
        parse_recipe({**base, "calibration": {"mix": [{"dataset": "a.txt", "weight": 0}]}})
    assert isinstance(parse_recipe({**base, "calibration": {"mix": [{"dataset": "a.txt", "format": "arc"}]}}), Recipe)


def test_named_arc_set_goes_through_datasets_in_hub_layout(monkeypatch, tmp_path, tokenizer):
    """calib/arc_easy.yaml's route (datasets + format arc) on a local file in the hub's flat layout."""
    hub = [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                        "label": [c["label"] for c in r["question"]["choices"]]}} for r in _arc_records(120)]
    (tmp_path / "arc.json").write_text("\n".join(json.dumps(r) for r in hub))
    (tmp_path / "arcset.yaml").write_text(f"path: json\ndata_files: {tmp_path / 'arc.json'}\nsplit: train\n"
                                          "format: arc\n")
    monkeypatch.setattr(calibration, "CALIB_DIR", tmp_path)
    from compress.recipe import CalibrationSource

    rows = calibration.load_rows(CalibrationSource(dataset="arcset"))
    assert rows[:3] == [calibration.arc_text(r) for r in _arc_records(3)]
    ids = calibration_tokens(None, tokenizer, CalibrationConfig(dataset="arcset", samples=4, seq_len=16),
                             tmp_path / "cache")
    assert ids.shape == (4, 16)


def test_selfgen_samples_with_the_cache_as_without(tmp_path):
    """The KV-cache sampler draws the same tokens as recomputing every prefix from scratch with the same generator;
    output is (samples, seq_len), starts with BOS, never holds EOS, and is the same twice for a seed."""
    from conftest import STORIES, needs_shared

    needs_shared()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.calibration import selfgen
    from compress.recipe import CalibrationConfig
    from compress.sampling import sample_categorical

    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(STORIES)
    cfg = CalibrationConfig(dataset="selfgen", samples=5, seq_len=12, seed=3)
    ids = selfgen(model, tok, cfg, 8)
    assert ids.shape == (5, 12) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.bos_token_id).all() and not (ids == tok.eos_token_id).any()
    assert torch.equal(ids, selfgen(model, tok, cfg, 8))
    g = torch.Generator().manual_seed(3)
    ref = torch.full((5, 12), tok.bos_token_id, dtype=torch.long)
    with torch.no_grad():
        for t in range(1, 12):
            ref[:, t] = sample_categorical(model(ref[:, :t]).logits[:, -1], g, tok.eos_token_id)
    assert torch.equal(ids, ref)


def test_categorical_draws_follow_the_distribution():
    """The inverse-CDF draw is exact: 40,000 draws from a fixed 6-way distribution (one token banned) match the
    renormalised probabilities (chi-square well below its 0.999 quantile), and the banned token never appears."""
    from compress.sampling import sample_categorical

    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, 3.0, -4.0]).log_softmax(0)
    draws = sample_categorical(logits.expand(40000, 6), torch.Generator().manual_seed(0), banned=4)
    p = logits.exp().double()
    p[4] = 0
    p /= p.sum()
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[4] == 0
    keep = p > 0
    chi2 = float(((counts[keep] - 40000 * p[keep]) ** 2 / (40000 * p[keep])).sum())
    assert chi2 < 20.5  # 4 degrees of freedom: P(chi2 > 20.5) = 0.0004


def test_preallocated_cache_gives_the_dynamic_caches_logits(tiny_model_dir):
    """Keys and values written in place give the same logits, step by step, as DynamicCache's concatenation."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from compress.sampling import preallocated_cache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2")).eval()
    ids = torch.randint(3, 150, (3, 10), generator=torch.Generator().manual_seed(0))
    outs = []
    for cache in (DynamicCache(), preallocated_cache(10)):
        steps = []
        with torch.inference_mode():
            for t in range(10):
                steps.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
        outs.append(torch.cat(steps, 1))
        assert cache.get_seq_length() == 10
    assert type(cache.layers[0]).__name__ == "PreallocatedLayer"  # the in-place cache was the one used
    assert torch.allclose(outs[0], outs[1], atol=1e-6, rtol=0)


def _chat_tokenizer(tokenizer):
    """A copy of ``tokenizer`` with a minimal chat template."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>{% endif %}")
    return tok


def _eos_model(tok, eos_logit: float):
    """A model class whose logits favour EOS by ``eos_logit`` over every other token."""
    from types import SimpleNamespace

    class Eager(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(len(tok), 4)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, input_ids, **kwargs):
            logits = torch.zeros(*input_ids.shape, len(tok))
            logits[..., tok.eos_token_id] = eos_logit
            return SimpleNamespace(logits=logits)

    return Eager


def test_chat_formatted_selfgen_packs_conversations(tokenizer):
    """With a chat template, the chat share of the rows are conversations: a bundled user turn rendered by the
    template, the model's reply up to its end of turn, then the next conversation; plain rows stay BOS + text
    without EOS. A model that nearly always ends its turn at once shows the packing."""
    from compress.recipe import CalibrationConfig
    from compress.selfgen import INSTRUCTIONS, chat_rows, selfgen

    tok = _chat_tokenizer(tokenizer)
    Eager = _eos_model(tok, 10.0)  # logits favour EOS (e^10 : 1 against each other token)

    cfg = CalibrationConfig(dataset="selfgen", samples=4, seq_len=96, seed=1, selfgen_chat=0.5)
    assert chat_rows(tok, 4, 0.5) == 2 and chat_rows(tok, 4, None) == 4 and chat_rows(tokenizer, 4, None) == 0
    ids = selfgen(Eager(), tok, cfg, 8)
    assert ids.shape == (4, 96)
    for r in (0, 1):  # conversations, each ended by EOS, back to back
        text = tok.decode(ids[r])
        turns = [t for t in INSTRUCTIONS if t in text]
        assert len(turns) >= 1 and int((ids[r] == tok.eos_token_id).sum()) >= 2
    for r in (2, 3):
        assert ids[r, 0] == tok.bos_token_id and not (ids[r] == tok.eos_token_id).any()
    assert torch.equal(ids, selfgen(Eager(), tok, cfg, 8))  # seeded


def test_selfgen_prompts_choose_the_user_turns(tokenizer, tmp_path):
    """``calibration.selfgen_prompts``: a bundled set by name or the user's own file of turns feeds the
    conversations (and keys the token cache); a bad name or file is refused at parse, naming the field."""
    from compress.errors import LrcError
    from compress.finetune.config import FinetuneConfig
    from compress.recipe import CalibrationConfig
    from compress.selfgen import INSTRUCTIONS, QUESTIONS, load_prompts, selfgen

    tok = _chat_tokenizer(tokenizer)
    Eager = _eos_model(tok, 30.0)  # ends its turn at once: the text is the turns, back to back

    mine = ["Tell me about owls.", "Why is snow white?"]
    (tmp_path / "turns.txt").write_text("\n".join(mine) + "\n\n")
    (tmp_path / "turns.jsonl").write_text("\n".join(json.dumps({"prompt": t}) for t in mine))
    assert load_prompts(None) == INSTRUCTIONS and load_prompts("instructions+questions") == INSTRUCTIONS + QUESTIONS
    for spec, pool in ((str(tmp_path / "turns.txt"), mine), (str(tmp_path / "turns.jsonl"), mine),
                       ("questions", QUESTIONS)):
        assert load_prompts(spec) == pool
        cfg = CalibrationConfig(dataset="selfgen", samples=2, seq_len=64, seed=0, selfgen_prompts=spec)
        text = "".join(tok.decode(r) for r in selfgen(Eager(), tok, cfg, 8))
        assert any(t in text for t in pool) and not any(t in text for t in INSTRUCTIONS)
    (tmp_path / "empty.txt").write_text("\n")
    for bad, expect in (("nope", "neither a bundled set"), (str(tmp_path / "empty.txt"), "no user turn")):
        with pytest.raises(LrcError, match=f"calibration.selfgen_prompts: .*{expect}"):
            CalibrationConfig(dataset="selfgen", selfgen_prompts=bad)
        with pytest.raises(LrcError, match=f"finetune.selfgen_prompts: .*{expect}"):
            FinetuneConfig(data="selfgen", selfgen_prompts=bad)


def test_finetune_takes_the_calibration_prompts():
    """A recipe's ``finetune.selfgen_prompts`` left unset, with ``data: selfgen`` after a ``selfgen`` calibration,
    takes the calibration's user turns; one given, a non-selfgen calibration or ``data`` keep theirs."""
    from compress.recipe import parse_recipe

    def ft(calibration: dict, finetune: dict):
        return parse_recipe({"calibration": calibration, "stages": [{"method": "svd", "param_ratio": 0.8}],
                             "finetune": finetune}).finetune.selfgen_prompts

    chat = {"dataset": "selfgen", "selfgen_prompts": "instructions+questions"}
    assert ft(chat, {"data": "selfgen"}) == "instructions+questions"
    assert ft(chat, {"data": "selfgen", "selfgen_prompts": "questions"}) == "questions"
    assert ft({"dataset": "selfgen"}, {"data": "selfgen"}) is None  # the bundled instructions, as before
    assert ft({"dataset": "wikitext2"}, {"data": "selfgen"}) is None
    assert ft(chat, {"data": "wikitext2"}) is None
    from compress.api import with_overrides  # ``--calib selfgen`` on a recipe written for Wikipedia: likewise

    wiki = parse_recipe({"calibration": {**chat, "dataset": "wikitext2"}, "finetune": {"data": "selfgen"},
                         "stages": [{"method": "svd", "param_ratio": 0.8}]})
    assert wiki.finetune.selfgen_prompts is None
    assert with_overrides(wiki, calibration__dataset="selfgen").finetune.selfgen_prompts == "instructions+questions"
