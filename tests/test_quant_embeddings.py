"""``quantize.embeddings`` (issue 25): the token embeddings stored as packed codes (``QuantEmbedding``), the head
tied to them computing its logits from the same table (``QuantTiedHead``, stored once) or an untied head as a
``QuantLinear``; rows and logits agree with RTN's dequantized table on every kernel path, the checkpoint reloads
with and without lrc with the in-memory logits, its accounting equals the bytes in ``model.safetensors``, and a
crashed run resumes to the same bytes."""
import json

import pytest
import torch
from torch import nn

from compress import api
from compress.checkpoint.module_types import stored_weights, unit_params
from compress.errors import LrcError
from compress.quant import QuantEmbedding, QuantLinear, QuantSpec, QuantTiedHead, rtn
from compress.recipe import parse_recipe
from test_quantize_engine import safetensors_payload


def _recipe(corpus, stages=(), embeddings=None, **quant):
    return parse_recipe({"calibration": {"dataset": str(corpus), "samples": 8, "seq_len": 32},
                         "engine": {"device": "cpu", "batch_size": 3},
                         "stages": [{"method": m, "param_ratio": r} for m, r in stages],
                         "quantize": {"bits": 4, "group_size": 16, "embeddings": embeddings or {"bits": 8},
                                      **quant}, "samples": 0})


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama whose ``lm_head`` is tied to ``embed_tokens`` (as SmolLM2's is)."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama", len(tokenizer))
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = tmp_path_factory.mktemp("tiny-llama-tied")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _table(W, bits, group, sym):
    q = rtn(W, QuantSpec(bits=bits, group_size=group, symmetric=sym))
    m = QuantEmbedding(W.shape[0], W.shape[1], bits, group, sym)
    for k, v in q.to_packed().items():
        getattr(m, k).copy_(v)
    return m, q.dequantize(torch.float32)


@pytest.mark.parametrize("bits, group, sym", [(8, None, True), (4, 32, False), (4, 64, True), (3, 16, False),
                                              (2, None, False)])
def test_rows_are_rtns_dequantized_rows(bits, group, sym):
    torch.manual_seed(0)
    m, W_hat = _table(torch.randn(50, 64, dtype=torch.float64), bits, group, sym)
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(m(ids), W_hat[ids])
    assert m.to(torch.bfloat16)(ids).dtype == torch.bfloat16  # the model's float type, as nn.Embedding's
    assert m.storage_bytes() == sum(t.numel() * t.element_size() for t in m.buffers())
    assert stored_weights(m) == unit_params(m) == 50 * 64


@pytest.mark.parametrize("bits, group, sym, dtype, vocab, path", [
    (8, None, True, torch.float32, 112, "dequantized"),  # the int8 kernel is ~60x slower than a GEMM in float32
    (8, None, True, torch.bfloat16, 100, "int8"),
    (4, 32, False, torch.bfloat16, 112, "int4_cpu"), (4, 64, True, torch.bfloat16, 112, "int4_cpu"),
    (4, 32, False, torch.bfloat16, 100, "int4_cpu"),  # rows padded to 16 at a time for the kernel
    (4, 32, False, torch.float32, 112, "dequantized"), (3, 16, False, torch.float32, 112, "dequantized")])
def test_tied_head_logits_are_h_times_the_dequantized_table(bits, group, sym, dtype, vocab, path):
    torch.manual_seed(0)
    m, W_hat = _table(torch.randn(vocab, 64, dtype=torch.float64), bits, group, sym)
    m = m.to(dtype)
    head = QuantTiedHead("model.embed_tokens", 64, vocab)
    head.lrc_link(lambda name: m if name == "model.embed_tokens" else None)
    h = torch.randn(2, 5, 64).to(dtype)
    assert m.kernel(h) == path
    ref = h.float() @ W_hat.T
    y = head(h)
    assert y.shape == (2, 5, vocab) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (y.float() - ref).norm() / ref.norm() < tol
    assert not list(head.parameters()) and not list(head.buffers()) and not list(head.children())
    assert head.storage_bytes() == stored_weights(head) == 0


def test_tied_head_refuses_a_table_of_another_shape():
    m, _ = _table(torch.randn(48, 64, dtype=torch.float64), 8, None, True)
    with pytest.raises(ValueError, match="not a quantized 50 x 64"):
        QuantTiedHead("e", 64, 50).lrc_link(lambda name: m)


def _quantized_modules(model) -> dict:
    return {n: m for n, m in model.named_modules() if hasattr(m, "storage_bytes")}


def _check_bytes(model, checkpoint, report, stages: bool = False) -> dict:
    """Each quantized module's ``storage_bytes`` equals its tensors in ``model.safetensors``; the report's
    quantization bytes, model parameters and checkpoint bytes count the embeddings once (without ``stages`` no
    weight is removed: the model's parameters, quantized ones included, are as many as before)."""
    sizes = safetensors_payload(checkpoint / "model.safetensors")
    for name, m in _quantized_modules(model).items():
        assert m.storage_bytes() == sum(v for k, v in sizes.items() if k.startswith(name + ".")), name
    sec = report["quantization"]
    names = {r["name"] for r in sec["rows"]}
    assert sec["bytes_after"] == sum(v for k, v in sizes.items() if k.rsplit(".", 1)[0] in names)
    emb = model.get_input_embeddings()
    head_bytes = model.get_output_embeddings().storage_bytes()
    assert report["checkpoint_bytes"]["embeddings_and_head"] == emb.storage_bytes() + head_bytes
    assert report["checkpoint_bytes"]["quantized"] == sec["bytes_after"]
    after = report["model_params"]["after"]
    n_head = 0 if isinstance(model.get_output_embeddings(), QuantTiedHead) else emb.num_embeddings * emb.embedding_dim
    assert after["embeddings_and_head"] == emb.num_embeddings * emb.embedding_dim + n_head
    assert stages or after["total"] == report["model_params"]["before"]["total"]
    return sizes


def test_tied_model_stores_the_table_once_and_reloads(tied_model_dir, corpus_file, tmp_path):
    """``quantize: {bits: 4, embeddings: {bits: 8}}`` on a tied model: one int8 table in the checkpoint, no
    ``lm_head`` tensor, no tie in the config; the in-memory model, ``compress.load`` and transformers' own
    ``from_pretrained(trust_remote_code=True)`` in a process without lrc give the same logits."""
    from conftest import reload_logits
    from transformers import AutoModelForCausalLM

    recipe = _recipe(corpus_file, stages=(("svd-llm", 0.6),))
    net = AutoModelForCausalLM.from_pretrained(tied_model_dir).eval()
    report = api.compress_model(net, recipe, cache_dir=tmp_path / "c0")
    assert isinstance(net.model.embed_tokens, QuantEmbedding) and isinstance(net.lm_head, QuantTiedHead)
    assert net.lm_head.table is net.model.embed_tokens
    rows = report["quantization"]["rows"]
    assert rows[0]["name"] == "model.embed_tokens" and rows[0]["kind"] == "embeddings"
    assert rows[0]["tied_head"] == "lm_head" and 0 < rows[0]["rel_error"] < 0.02
    assert report["quantization"]["embeddings"]["bytes_after"] < 0.3 * rows[0]["bytes_before"]
    api.save(net, None, tmp_path / "m", report)
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        want = net(x).logits
        torch.testing.assert_close(api.load(tmp_path / "m")(x).logits, want, atol=0, rtol=0)
    torch.testing.assert_close(reload_logits(tmp_path / "m", x, tmp_path), want, atol=1e-6, rtol=0)

    out, report = api.compress(str(tied_model_dir), recipe, tmp_path / "a", cache_dir=tmp_path / "c1",
                               progress=False)  # the streamed writer (the CLI's)
    sizes = _check_bytes(out, tmp_path / "a", report, stages=True)
    assert not [k for k in sizes if k.startswith("lm_head")] and "model.embed_tokens.weight" not in sizes
    assert sizes["model.embed_tokens.qweight"] == out.config.vocab_size * out.config.hidden_size  # once, int8
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["lrc"]["modules"]["lm_head"] == {"type": "quant_tied_head", "embeddings": "model.embed_tokens",
                                                  "in_features": 64, "out_features": out.config.vocab_size}
    assert isinstance(out.lm_head, QuantTiedHead) and out.lm_head.table is out.model.embed_tokens
    with torch.no_grad():
        torch.testing.assert_close(reload_logits(tmp_path / "a", x, tmp_path), out(x).logits, atol=1e-6, rtol=0)
        assert out.generate(x[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_untied_head_becomes_a_quant_linear(tiny_model_dir, corpus_file, tmp_path):
    """tie_word_embeddings False: the embeddings and the head are quantized separately (int4 groups of 32)."""
    from conftest import reload_logits

    recipe = _recipe(corpus_file, embeddings={"bits": 4, "group_size": 32, "symmetric": False})
    out, report = api.compress(str(tiny_model_dir("llama")), recipe, tmp_path / "a", cache_dir=tmp_path / "c",
                               progress=False)
    assert isinstance(out.model.embed_tokens, QuantEmbedding) and type(out.lm_head) is QuantLinear
    assert (out.lm_head.bits, out.lm_head.group_size, out.lm_head.symmetric) == (4, 32, False)
    rows = report["quantization"]["rows"]
    assert [(r["name"], r["kind"]) for r in rows[:2]] == [("model.embed_tokens", "embeddings"), ("lm_head", "head")]
    assert rows[0]["tied_head"] is None and all(r["method"] == "rtn" for r in rows[:2])
    sizes = _check_bytes(out, tmp_path / "a", report)
    assert "lm_head.qweight" in sizes and "lm_head.weight" not in sizes
    x = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reload_logits(tmp_path / "a", x, tmp_path), out(x).logits, atol=1e-6, rtol=0)


def test_embeddings_alone_without_stages(tied_model_dir, corpus_file, tmp_path):
    """No stage and every block Linear ignored: only the embeddings (and the tied head through them) are quantized."""
    recipe = _recipe(corpus_file, ignore=["."])
    out, report = api.compress(str(tied_model_dir), recipe, tmp_path / "a", cache_dir=tmp_path / "c",
                               progress=False)
    assert report["quantization"]["matrices"] == 1
    assert isinstance(out.model.embed_tokens, QuantEmbedding) and isinstance(out.lm_head, QuantTiedHead)
    assert all(type(m) is nn.Linear for n, m in out.named_modules() if n.endswith("_proj"))
    assert set(json.loads((tmp_path / "a" / "config.json").read_text())["lrc"]["modules"]) == \
        {"model.embed_tokens", "lm_head"}
    _check_bytes(out, tmp_path / "a", report)


def test_resume_quantizes_the_embeddings_to_the_same_bytes(tied_model_dir, corpus_file, tmp_path, monkeypatch):
    """The embeddings are not in the run cache: a run killed after block 1 quantizes them again on resume, to the
    bytes (checkpoint and report rows) of an uninterrupted run."""
    from conftest import resume_after_crash

    recipe = _recipe(corpus_file, stages=(("svd-llm", 0.6),), method="rtn")
    _, report = api.compress(str(tied_model_dir), recipe, tmp_path / "a", cache_dir=tmp_path / "c1",
                             progress=False, return_model=False)
    again = resume_after_crash(monkeypatch, str(tied_model_dir), recipe, tmp_path / "b", tmp_path / "c2",
                               tmp_path / "a")

    def timeless(rows):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    assert timeless(again["quantization"]["rows"]) == timeless(report["quantization"]["rows"])


def test_bad_embeddings_settings_are_one_line_errors(corpus_file):
    with pytest.raises(LrcError, match="embeddings"):
        _recipe(corpus_file, embeddings={"bits": 5})
    with pytest.raises(LrcError, match="embeddings"):
        _recipe(corpus_file, embeddings={"bits": 8, "group_size": 0})
