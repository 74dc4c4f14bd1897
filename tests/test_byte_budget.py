"""The byte budget (issue 25 part 3): a ``search`` stage with ``byte_ratio`` and ``quantize.bits_options`` chooses
each module's knob AND bit width under one budget in bytes (``allocation/bits.py``); the checkpoint stores each
module at its chosen width, within the budget, and reloads without lrc."""
import pytest
import torch

from compress.allocation.bits import Residual, Widths, linear_bytes, quant_errors, spec_for, unit_bytes
from compress.linalg import weighted_error
from compress.allocation.search import candidates
from compress.errors import LrcError
from compress.plan import PlanRow
from compress.quant.math import QuantSpec, rtn, storage_bytes
from compress.recipe import QuantizeConfig, parse_recipe

OPTS = {"trials": 2, "samples": 2, "temperature": 0.6, "k_min": 0.1}


def _recipe(corpus, methods=("svd-llm",), ratio=0.3, bits=(4, 8, 16), **quant):
    return parse_recipe({"calibration": {"dataset": str(corpus), "samples": 8, "seq_len": 32},
                         "engine": {"device": "cpu", "batch_size": 3},
                         "stages": [{"methods": list(methods), "byte_ratio": ratio, "allocator": "search",
                                     "allocator_options": OPTS}],
                         "quantize": {"bits": 4, "group_size": 16, "method": "rtn", "bits_options": list(bits),
                                      **quant},
                         "samples": 0})


def _row(m=48, n=32, bias=False):
    return PlanRow("l", 0, "svd-llm", 0, m, n, bias, None, None)


def test_linear_bytes_count_the_stored_tensors():
    spec = QuantSpec(4, 16)
    row = _row(bias=True)
    assert linear_bytes(row, None, None) == 2 * (48 * 32 + 48)
    assert linear_bytes(row, None, spec) == storage_bytes(48, 32, spec) + 2 * 48
    assert linear_bytes(row, 8, spec) == storage_bytes(8, 32, spec) + storage_bytes(48, 8, spec) + 2 * 48
    assert unit_bytes(1000, None) == 2000
    # quantize.compensate: a residual of rank min(R, m, n) on every quantized matrix (each factor), none at 16 bits
    res = Residual(4)
    assert linear_bytes(row, None, spec, res) == linear_bytes(row, None, spec) + 2 * 4 * (48 + 32)
    assert linear_bytes(row, 2, spec, res) == linear_bytes(row, 2, spec) + 2 * 2 * (2 + 32) + 2 * 2 * (48 + 2)
    assert linear_bytes(row, None, None, res) == linear_bytes(row, None, None)
    q8 = QuantSpec(8, None, True)  # a quantized residual: its two factors' storage
    assert linear_bytes(row, None, spec, Residual(4, q8)) == linear_bytes(row, None, spec) + storage_bytes(
        4, 32, q8) + storage_bytes(48, 4, q8)
    assert 500 < unit_bytes(1000, QuantSpec(4, 100)) < 2000 / 3  # codes + 10 groups of scale and zero


def test_weighted_error_is_the_gram_norm_and_rtn_error_falls_with_bits():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(24, 32, generator=g, dtype=torch.float64), torch.randn(32, 200, generator=g,
                                                                              dtype=torch.float64)
    Wq = rtn(W, QuantSpec(4, 16)).dequantize(torch.float64)
    assert weighted_error(W, Wq, X @ X.T) ** 2 == pytest.approx(float(((W - Wq) @ X).pow(2).sum()
                                                                     / (W @ X).pow(2).sum()))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    A, B = U[:, :8] * S[:8], Vh[:8]
    q = quant_errors(W, X @ X.T, (A, B), {b: QuantSpec(b, 16) for b in (2, 3, 4, 8)})
    assert q[:, 0].tolist() == [2, 3, 4, 8]
    assert (q[1:, 1] < q[:-1, 1]).all() and (q[1:, 2] < q[:-1, 2]).all()  # both fall with every bit


def test_width_candidates_price_bytes_and_add_the_quantization_error():
    row = _row()
    sigma = torch.linspace(3, 0.1, 32, dtype=torch.float64)
    q = torch.tensor([[4, 0.01, 0.02], [8, 1e-4, 2e-4]], dtype=torch.float64)
    widths = Widths([4, 8, 16], QuantizeConfig(bits=4, group_size=16), {"l": q})
    plain = candidates(row, sigma, 1.0, 1.0, 0.0, OPTS)
    wide = candidates(row, sigma, 1.0, 1.0, 0.0, OPTS, widths)
    # the Pareto front of bytes and error: cheaper options have more error
    assert all(a.bytes < b.bytes and a.error > b.error for a, b in zip(wide, wide[1:]))
    assert wide[-1].knob is None and wide[-1].bits == 16 and wide[-1].error == 0  # dense, unquantized
    assert {c.bits for c in wide} == {4, 8, 16}
    t = {c.knob: c.error for c in plain}  # 16 bits: the plain candidates (truncation error, scaled)
    for c in wide:
        spec = spec_for(widths.quant, c.bits)
        assert c.bytes == linear_bytes(row, c.knob, spec)
        tail = 0.0 if c.knob is None else t[c.knob] * _t0(sigma, row)
        qe = 0.0 if spec is None else {4: (0.01, 0.02), 8: (1e-4, 2e-4)}[c.bits][c.knob is not None]
        assert c.error == pytest.approx((tail + (1 - tail) * qe) / _t0(sigma, row))


def _t0(sigma, row):
    from compress.allocation.search import anchor_rank, tail_curve

    return tail_curve(sigma)(anchor_rank(row, 0.1))


def test_byte_budget_needs_its_parts():
    with pytest.raises(LrcError, match="bits_options"):
        parse_recipe({"stages": [{"method": "svd-llm", "byte_ratio": 0.3, "allocator": "search"}],
                      "quantize": {"bits": 4}})
    with pytest.raises(LrcError, match="allocator search"):
        parse_recipe({"stages": [{"method": "svd-llm", "byte_ratio": 0.3}], "quantize": {"bits_options": [4]}})
    with pytest.raises(LrcError, match="byte_ratio"):
        parse_recipe({"stages": [{"method": "svd-llm", "param_ratio": 0.3}], "quantize": {"bits_options": [4]}})
    with pytest.raises(LrcError, match="bits_options"):
        parse_recipe({"stages": [{"method": "svd-llm", "byte_ratio": 0.3, "allocator": "search"}],
                      "quantize": {"bits_options": [16]}})


@pytest.mark.parametrize("methods", [("svd-llm",), ("modegpt", "svd-llm")])
def test_byte_budget_search_holds_the_budget_and_stores_each_width(methods, tiny_model_dir, corpus_file, tmp_path,
                                                                   monkeypatch):
    """The program's bytes stay within the budget, widths are traded (not one for all), every module is stored at
    the width chosen for it (16: a plain Linear or factor pair), the bytes written match the program's for the
    Linear rows, the checkpoint reloads without lrc with the same logits, and (Linear rows) a run killed after a
    block resumes to the same bytes."""
    from conftest import reload_logits, resume_after_crash
    from test_quantize_engine import safetensors_payload

    from compress import api
    from compress.quant import QuantLinear

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    model, recipe = str(tiny_model_dir("llama")), _recipe(corpus_file, methods)
    out, report = api.compress(model, recipe, tmp_path / "a", cache_dir=tmp_path / "c", progress=False)
    record = report["allocation"]["0"]
    assert record["unit"] == "bytes" and record["bytes"] <= record["budget"]
    chosen = {k: v["candidates"][v["chosen"]] for k, v in record["rows"].items() if v["chosen"] is not None}
    assert len({c["bits"] for c in chosen.values()}) >= 2
    bits = {r["name"]: r["bits"] for r in report["quantization"]["rows"]}
    stored = {}
    for name, m in out.named_modules():
        if ".layers." in name and isinstance(m, (QuantLinear, torch.nn.Linear)):
            stored[name] = m.bits if isinstance(m, QuantLinear) else 16
    for key, c in chosen.items():
        row = record["rows"][key]
        members = [n for n in stored if n == key.split("@")[0] or n.startswith(key.split("@")[0] + ".")]
        if row["method"] != "modegpt":
            assert members and {stored[n] for n in members} == {c["bits"]}, key
    assert all(bits[n] == stored[n] for n in bits)
    sizes = safetensors_payload(tmp_path / "a" / "model.safetensors")
    if methods == ("svd-llm",):  # Linear rows are priced exactly: the program's bytes are the file's
        import json
        import struct

        with open(tmp_path / "a" / "model.safetensors", "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        written = sum(v for k, v in sizes.items() if ".layers." in k and "norm" not in k
                      and header[k]["dtype"] != "F32") + sum(  # the float32 model's unquantized tensors at 2 bytes
            v // 2 for k, v in sizes.items() if ".layers." in k and "norm" not in k and header[k]["dtype"] == "F32")
        assert written == record["bytes"]
    x = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reload_logits(tmp_path / "a", x, tmp_path), out(x).logits, atol=1e-5, rtol=0)
    if methods == ("svd-llm",):
        again = resume_after_crash(monkeypatch, model, recipe, tmp_path / "b", tmp_path / "c2", tmp_path / "a")
        assert again["allocation"] == report["allocation"]


def test_byte_budget_counts_the_compensation(tiny_model_dir, corpus_file, tmp_path):
    """``quantize.compensate`` under a byte budget (its residual in int8): every quantized module carries its
    residual, the program priced it (the bytes written, residuals included, are the program's), the checkpoint
    reloads without lrc with the same logits and the budget holds; MoDeGPT units, or a
    method that is no compensation, are refused in one line before any work."""
    from compress import api
    from compress.methods.eora.lrc_compensated import CompensatedLinear
    from compress.quant import QuantLinear
    from test_quantize_engine import safetensors_payload

    model = str(tiny_model_dir("llama"))
    recipe = _recipe(corpus_file, compensate={"rank": 2, "bits": 8})
    out, report = api.compress(model, recipe, tmp_path / "a", cache_dir=tmp_path / "c", progress=False)
    record = report["allocation"]["0"]
    assert record["bytes"] <= record["budget"]
    rows = report["quantization"]["rows"]
    comp = {n for n, m in out.named_modules() if isinstance(m, CompensatedLinear)}
    assert rows and {r["name"] for r in rows} == comp and all(r["compensated_rank"] == 2 for r in rows)
    assert all(isinstance(m.lora_A, QuantLinear) and m.lora_B.bits == 8 for m in out.modules()
               if isinstance(m, CompensatedLinear))
    import json
    import struct

    sizes = safetensors_payload(tmp_path / "a" / "model.safetensors")
    with open(tmp_path / "a" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    written = sum(v if header[k]["dtype"] != "F32" else v // 2 for k, v in sizes.items()
                  if ".layers." in k and "norm" not in k)
    assert written == record["bytes"]
    from conftest import reload_logits

    x = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reload_logits(tmp_path / "a", x, tmp_path), out(x).logits, atol=1e-5, rtol=0)
    with pytest.raises(LrcError, match="quantize.compensate: a byte budget prices the residuals of Linear rows only"):
        _recipe(corpus_file, methods=("modegpt", "svd-llm"), compensate={"rank": 2})
    with pytest.raises(LrcError, match="quantize.compensate.method: 'svd-llm' is not a compensation method"):
        _recipe(corpus_file, compensate={"rank": 2, "method": "svd-llm"})
