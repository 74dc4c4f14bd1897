"""Evaluation: paper-style perplexity equals an independent transformers computation; windows; KL; lrc eval."""
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from compress.cli import app
from compress.errors import LrcError
from compress.eval.kl import kl_to_reference
from compress.eval.perplexity import perplexity, tokenize, window_spans
from conftest import SHARED, STORIES, needs_shared, tiny_recipe

TEXT = (Path(__file__).parent / "data" / "tinystories_style.txt").read_text()


def test_non_overlapping_windows_drop_the_partial_tail():
    assert window_spans(10, 4) == [(0, 4, 0), (4, 8, 4)]
    assert window_spans(10, 4, max_windows=1) == [(0, 4, 0)]
    with pytest.raises(ValueError, match="fewer than one window"):
        window_spans(3, 4)


def test_sliding_windows_score_every_token_once():
    spans = window_spans(10, 4, stride=2)
    assert spans == [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    scored = [t for s, e, first in spans for t in range(max(first, s + 1), e)]
    assert scored == list(range(1, 10))
    with pytest.raises(ValueError, match="stride"):
        window_spans(10, 4, stride=5)


@needs_shared()
@pytest.mark.parametrize("bos", [False, True])
def test_perplexity_matches_plain_transformers(bos):
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    ids = tokenize(tok, TEXT)
    L = 128
    total, count = 0.0, 0
    with torch.no_grad():  # independent reference: one window at a time, labels= loss (mean over its targets)
        for s in range(0, ids.numel() - L + 1, L):
            x = ids[s : s + L][None]
            if bos:
                x = torch.cat([torch.tensor([[tok.bos_token_id]]), x], 1)
            n = x.shape[1] - 1
            total += float(model(x, labels=x).loss.double()) * n
            count += n
    expected = math.exp(total / count)
    res = perplexity(model, tok, TEXT, seq_len=L, bos=bos, batch_size=3)
    assert res.tokens == count
    assert abs(res.perplexity - expected) <= 1e-6 * expected


@needs_shared()
def test_sliding_window_perplexity_is_lower_with_more_context():
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    flat = perplexity(model, tok, TEXT, seq_len=64)
    slide = perplexity(model, tok, TEXT, seq_len=64, stride=32)
    assert slide.tokens > flat.tokens and slide.perplexity < flat.perplexity


def test_kl_of_a_model_to_itself_is_zero(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    ids = torch.randint(0, len(tokenizer), (300,))
    res = kl_to_reference(model, model, ids, seq_len=64)
    assert abs(res.kl) < 1e-6 and res.top1_agreement == 1.0 and res.tokens == 4 * 63


def test_kl_and_agreement_match_an_independent_computation(tiny_model_dir, tokenizer):
    """Two different models: lrc's mean token KL equals torch's ``kl_div`` over the vocabulary at every scored
    position (one window at a time, no lrc code), in the direction KL(dense ‖ model), i.e. the expectation under
    the reference; the reverse direction is a different number, so a swapped argument order fails here. Top-1
    agreement is the fraction of positions whose argmax tokens agree."""
    import torch.nn.functional as F

    from conftest import tiny_config

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer))).eval()
    with torch.no_grad():  # make the pair close enough that the argmax often agrees, far enough that KL is not 0
        for p, q in zip(dense.parameters(), other.parameters()):
            q.copy_(p + 0.15 * (q - p))
        dense.lm_head.weight.mul_(8)  # a sharp reference and a flatter model (argmax unchanged by the scale):
        other.lm_head.weight.mul_(2)  # KL's two directions then differ clearly
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (300,), generator=g)
    L = 64
    kl_sum, kl_rev, agree, n = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for s in range(0, ids.numel() - L + 1, L):
            x = ids[s : s + L][None]
            p_log = F.log_softmax(dense(x).logits[0, :-1].double(), -1)  # position t predicts token t+1
            q_log = F.log_softmax(other(x).logits[0, :-1].double(), -1)
            kl_sum += float(F.kl_div(q_log, p_log, log_target=True, reduction="sum"))  # Σ p (log p − log q)
            kl_rev += float(F.kl_div(p_log, q_log, log_target=True, reduction="sum"))
            agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
            n += L - 1
    res = kl_to_reference(other, dense, ids, seq_len=L, batch_size=3)
    assert res.tokens == n == 4 * 63
    assert res.kl == pytest.approx(kl_sum / n, rel=1e-4)
    assert abs(kl_rev - kl_sum) > 0.02 * kl_sum  # the two directions differ by far more than the tolerance
    assert 0 < agree < n and res.top1_agreement == pytest.approx(agree / n, abs=0.5 / n)


@needs_shared()
def test_lrc_eval_on_a_checkpoint_merges_into_its_report(tmp_path, corpus_file):
    from compress import api

    wiki = SHARED / "data" / "wikitext2" / "wikitext2_raw_test.jsonl"
    out = tmp_path / "ck"
    api.compress(str(STORIES), tiny_recipe(corpus_file, param_ratio=0.8, seq_len=64), out,
                 cache_dir=tmp_path / "c", progress=False)
    res = CliRunner().invoke(app, ["eval", str(out), "--ppl", str(wiki), "--seq-len", "256", "--max-windows", "4",
                                   "--reference", str(STORIES), "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "e.json").read_text())
    r = results["perplexity"][str(wiki)]
    assert r["windows"] == 4 and r["tokens"] == 4 * 255 and "non-overlapping" in r["protocol"]
    kl = results["kl"][str(wiki)]
    assert kl["kl"] > 0 and 0 < kl["top1_agreement"] < 1
    report = json.loads((out / "lrc_report.json").read_text())
    assert report["eval"]["perplexity"][str(wiki)]["perplexity"] == r["perplexity"]
    bad = CliRunner().invoke(app, ["eval", str(out), "--ppl", "nosuchset"])
    assert bad.exit_code == 2 and "unknown evaluation set" in bad.output


@needs_shared()
def test_named_eval_set_goes_through_datasets(monkeypatch, tmp_path):
    """``--ppl NAME`` loads the set's eval split with datasets (the hub code path), here from a local json file,
    and gives the same text as the local file."""
    from compress import calibration
    from compress.eval.data import load_eval_text

    wiki = SHARED / "data" / "wikitext2" / "wikitext2_raw_test.jsonl"
    (tmp_path / "wiki.yaml").write_text(f"path: json\ntext_field: text\neval:\n  split: train\n  data_files: {wiki}\n")
    monkeypatch.setattr(calibration, "CALIB_DIR", tmp_path)
    text = load_eval_text("wiki")
    assert text == load_eval_text(str(wiki))
    joined = SHARED / "data" / "wikitext2" / "wikitext2_test_joined.txt"
    if joined.is_file():
        assert text == joined.read_text()


def test_bench_counts_and_speedups(tiny_model_dir, corpus_file, tmp_path):
    """lrc bench on a compressed checkpoint and its dense reference: structure and the honest counts (no timing
    assertions: speed belongs to benchmarks, not tests)."""
    from compress import api

    dense = str(tiny_model_dir("llama"))
    out = tmp_path / "ck"
    _, report = api.compress(dense, tiny_recipe(corpus_file, param_ratio=0.5), out, cache_dir=tmp_path / "c",
                             progress=False)
    res = CliRunner().invoke(app, ["bench", str(out), "--reference", dense, "--seq-lens", "16,32",
                                   "--decode-batches", "1,2", "--decode-tokens", "4", "--repeats", "1",
                                   "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    b = json.loads((tmp_path / "b.json").read_text())
    m, r = b["models"]["model"], b["models"]["reference"]
    assert r["params_block_linears"] == report["targeted"]["params_before"]
    assert m["params_block_linears"] == report["targeted"]["params_after"]
    assert m["params_total"] == report["model_params"]["after"]["total"]
    from transformers import AutoConfig

    head = 64 * AutoConfig.from_pretrained(dense).vocab_size  # lm_head of the tiny model (not tied)
    assert b["flop_ideal_speedup"] == pytest.approx((r["params_block_linears"] + head) /
                                                    (m["params_block_linears"] + head), rel=1e-3)
    assert set(m["prefill_tokens_per_s"]) == {"16", "32"} and all(v > 0 for v in m["decode_tokens_per_s"].values())
    assert m["checkpoint_bytes"] < r["checkpoint_bytes"]


@needs_shared(SHARED / "data" / "arc_easy")
def test_recipe_eval_section_runs_after_compression(tmp_path, corpus_file, monkeypatch):
    """A recipe's ``eval`` section: perplexity, KL to the input model and zero-shot land in lrc_report.json;
    ``lrc eval --tasks`` on the checkpoint later adds tasks to the same report and recomputes the mean."""
    from compress import api
    from compress.recipe import parse_recipe

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))
    data = tiny_recipe(corpus_file, param_ratio=0.8, seq_len=64).model_dump(mode="json")
    data["eval"] = {"ppl": [str(corpus_file)], "seq_len": 64, "max_windows": 3, "kl": True, "tasks": ["arc_easy"],
                    "limit": 5, "data_dir": str(SHARED / "data")}
    out = tmp_path / "ck"
    _, report = api.compress(str(STORIES), parse_recipe(data), out, cache_dir=tmp_path / "c", progress=False)
    ev = json.loads((out / "lrc_report.json").read_text())["eval"]
    assert ev["perplexity"][str(corpus_file)]["windows"] == 3 and ev["kl"][str(corpus_file)]["kl"] > 0
    assert ev["zero_shot"]["tasks"]["arc_easy"]["n"] == 5
    res = CliRunner().invoke(app, ["eval", str(out), "--tasks", "piqa", "--limit", "5", "--data-dir",
                                   str(SHARED / "data")])
    assert res.exit_code == 0, res.output
    zs = json.loads((out / "lrc_report.json").read_text())["eval"]["zero_shot"]
    assert set(zs["tasks"]) == {"arc_easy", "piqa"} and zs["mean"]["acc_tasks"] == 2
    assert str(corpus_file) in json.loads((out / "lrc_report.json").read_text())["eval"]["perplexity"]

    data["eval"]["ppl"] = [str(tmp_path / "missing.txt")]  # checked before any compression work
    with pytest.raises(LrcError, match="eval.ppl: .*missing.txt: file not found"):
        api.compress(str(STORIES), parse_recipe(data), tmp_path / "ck2", cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "ck2").exists()
