"""The ``quantize`` section (issue 25): a block's Linears after its stages become ``QuantLinear`` (packed codes,
per-group scales), GPTQ with the Gram each matrix sees; the checkpoint reloads without lrc with the same logits, the
accounting equals the bytes in ``model.safetensors``, resume is byte-identical, and the kernels agree with the
dequantized weight."""
import json
import struct

import pytest
import torch
import torch.nn.functional as F

from compress import api
from compress.quant import QuantLinear, QuantSpec, rtn
from compress.recipe import parse_recipe


def _recipe(corpus, stages=(("svd-llm", 0.6),), **quant):
    return parse_recipe({"calibration": {"dataset": str(corpus), "samples": 8, "seq_len": 32},
                         "engine": {"device": "cpu", "batch_size": 3},
                         "stages": [{"method": m, "param_ratio": r} for m, r in stages],
                         "quantize": {"bits": 4, "group_size": 16, **quant}, "samples": 0})


def safetensors_payload(path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, from its header (the file is 8 + header + the sum of these)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def test_factors_quantized_reload_without_lrc_and_bytes_add_up(tiny_model_dir, corpus_file, tmp_path):
    from conftest import reload_logits

    out, report = api.compress(str(tiny_model_dir("llama")), _recipe(corpus_file), tmp_path / "a",
                               cache_dir=tmp_path / "c", progress=False)
    quant = [m for m in out.modules() if isinstance(m, QuantLinear)]
    assert quant and not any(type(m) is torch.nn.Linear for n, m in out.named_modules()
                             if ".layers." in n and "lm_head" not in n)
    sec = report["quantization"]
    assert sec["matrices"] == len(quant) and sec["bytes_after"] < 0.3 * sec["bytes_before"]
    assert all(0 < r["rel_error"] < 0.5 for r in sec["rows"])
    names = {r["name"] for r in sec["rows"]}
    assert any(n.endswith(".first") for n in names) and any(n.endswith(".second") for n in names)
    # the bytes in the file: each QuantLinear's storage_bytes equals its tensors there
    sizes = safetensors_payload(tmp_path / "a" / "model.safetensors")
    for name, m in out.named_modules():
        if isinstance(m, QuantLinear):
            assert m.storage_bytes() == sum(v for k, v in sizes.items() if k.startswith(name + ".")), name
    assert sum(r["bytes_after"] for r in sec["rows"]) == sum(
        v for k, v in sizes.items() if k.rsplit(".", 1)[0] in names)
    x = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reload_logits(tmp_path / "a", x, tmp_path), out(x).logits, atol=1e-5, rtol=0)


def test_quantization_alone_gptq_beats_rtn(tiny_model_dir, corpus_file, tmp_path):
    """No stage: the dense model's Linears quantized (the baselines); GPTQ's weighted error below RTN's."""
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(tiny_model_dir("qwen2")).num_hidden_layers
    errs = {}
    for method in ("rtn", "gptq"):
        _, report = api.compress(str(tiny_model_dir("qwen2")), _recipe(corpus_file, stages=(), bits=3,
                                                                       method=method),
                                 tmp_path / method, cache_dir=tmp_path / f"c{method}", progress=False,
                                 return_model=False)
        errs[method] = report["quantization"]["mean_rel_error"]
        assert report["quantization"]["matrices"] == 7 * layers  # q k v o gate up down per block
    assert errs["gptq"] < errs["rtn"]


@pytest.mark.parametrize("bits, group, sym, shape", [
    (4, 32, False, (48, 128)), (4, 64, True, (48, 128)), (8, None, True, (48, 128)), (3, 16, False, (48, 128)),
    # padded int4 layouts: 576 inputs at groups of 128 (SmolLM2), a rank under the group (one group a row), rows
    # not a multiple of 16 (a factor's first half)
    (4, 128, False, (48, 576)), (4, 128, True, (576, 100)), (4, 64, False, (37, 200)), (4, None, False, (48, 300)),
    (8, None, True, (576, 137))])  # int8: inputs padded to 16 at a time (the kernel crashes otherwise)
def test_kernels_agree_with_the_dequantized_weight(bits, group, sym, shape):
    torch.manual_seed(0)
    n, k = shape
    W = torch.randn(n, k, dtype=torch.float64)
    q = rtn(W, QuantSpec(bits=bits, group_size=group, symmetric=sym))
    m = QuantLinear(k, n, bits, group, sym, bias=True)
    for name, v in q.to_packed().items():
        getattr(m, name).copy_(v)
    torch.nn.init.normal_(m.bias)
    x = torch.randn(5, 7, k)
    ref = x @ q.dequantize(torch.float32).T + m.bias
    torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-4)  # float32: the dequantized path
    xb = x.to(torch.bfloat16)
    mb = m.to(torch.bfloat16)
    want = {4: "int4_cpu", 8: "int8"}.get(bits, "dequantized") if (bits, k) != (4, 300) else "dequantized"
    assert mb.kernel(xb) == want  # 300 inputs in one group: no kernel group holds them
    y = mb(xb).float()
    assert y.shape == (5, 7, n)
    # bfloat16 activations: within bfloat16's rounding of the float32 product (the dequantized path's, measured)
    err, floor = (y - ref).norm() / ref.norm(), (F.linear(xb, mb.dequantized(torch.bfloat16), mb.bias).float()
                                                  - ref).norm() / ref.norm()
    assert err < 2 * floor + 1e-3
    # a longer call (prefill) where a kernel applies: a weight dequantized for the call, the same bits, not kept
    assert torch.equal(m.transient_weight(torch.float32), m.dequantized(torch.float32))
    long = torch.randn(3, 40, k).to(torch.bfloat16)
    assert mb.kernel(long) == ("transient" if want != "dequantized" else "dequantized")
    mb._cache.clear()
    y = mb(long)
    assert bool(mb._cache) == (want == "dequantized")
    torch.testing.assert_close(y, F.linear(long, mb.dequantized(torch.bfloat16), mb.bias))


def test_eora_compensates_the_quantization_error(tiny_model_dir, corpus_file, tmp_path):
    """``lrc compensate`` on a quantized dense model (quantization alone, 3 bits): EoRA's residual paths wrap the
    ``QuantLinear`` modules, lower the KL to the dense model and reload."""
    dense = str(tiny_model_dir("llama"))
    api.compress(dense, _recipe(corpus_file, stages=(), bits=3, method="rtn"), tmp_path / "q",
                 cache_dir=tmp_path / "c", progress=False, return_model=False)
    fixed, report = api.compensate(dense, str(tmp_path / "q"), tmp_path / "e", rank=4,
                                   calibration={"dataset": str(corpus_file), "samples": 8, "seq_len": 32},
                                   cache_dir=tmp_path / "c2", progress=False)
    from compress.methods.eora.lrc_compensated import CompensatedLinear

    wrapped = [m for m in fixed.modules() if isinstance(m, CompensatedLinear)]
    assert wrapped and all(isinstance(m.base, QuantLinear) for m in wrapped)
    quantized = api.load(tmp_path / "q")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(dense).eval()
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        p = torch.log_softmax(base(x).logits, -1)
        kl = {name: float((p.exp() * (p - torch.log_softmax(m(x).logits, -1))).sum(-1).mean())
              for name, m in (("quantized", quantized), ("eora", fixed))}
    assert kl["eora"] < kl["quantized"]


def test_modegpt_quantized_resumes_byte_identically(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """MoDeGPT's resized Linears (inside its attention module too) quantized with GPTQ; a run killed after block 1
    resumes to the bytes of an uninterrupted one; casting to bfloat16 keeps the float16 scales."""
    from conftest import resume_after_crash

    model = str(tiny_model_dir("qwen2"))
    recipe = _recipe(corpus_file, stages=(("modegpt", 0.7),), symmetric=True)
    out, report = api.compress(model, recipe, tmp_path / "a", cache_dir=tmp_path / "c1", progress=False)
    names = {r["name"] for r in report["quantization"]["rows"]}
    assert any(".mlp." in n for n in names) and any(".self_attn." in n for n in names)

    again = resume_after_crash(monkeypatch, model, recipe, tmp_path / "b", tmp_path / "c2", tmp_path / "a")

    def timeless(rows):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    assert timeless(again["quantization"]["rows"]) == timeless(report["quantization"]["rows"])
    half = out.to(torch.bfloat16)
    q = next(m for m in half.modules() if isinstance(m, QuantLinear))
    assert q.scales.dtype == torch.float16 and q.compute_dtype == torch.bfloat16


def test_cli_plan_and_compress_quantization_alone(tiny_model_dir, corpus_file, tmp_path):
    """``lrc plan`` says what the section will do; ``lrc compress`` of a recipe without stages prints its summary."""
    import yaml
    from typer.testing import CliRunner

    from compress.cli import app

    recipe = tmp_path / "q.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"dataset": str(corpus_file), "samples": 8, "seq_len": 32},
                                      "engine": {"device": "cpu"}, "quantize": {"bits": 4, "group_size": 16},
                                      "samples": 0}))
    model = str(tiny_model_dir("llama"))
    res = CliRunner().invoke(app, ["plan", model, "--recipe", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "no stage" in res.output and "then quantized (gptq, int4, groups of 16)" in res.output
    res = CliRunner().invoke(app, ["compress", model, "--recipe", str(recipe), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "quantized" in res.output and "checkpoint tensors" in res.output


def test_compensate_inside_the_run_repairs_quantization_and_counts_its_bytes(tiny_model_dir, corpus_file, tmp_path,
                                                                             monkeypatch):
    """``quantize.compensate`` (EoRA after each block's quantization): every quantized Linear gets a residual path
    whose weighted error is below its quantization error, equal to EoRA's closed form on the same Gram (a full-rank
    residual repairs it exactly); the report's bytes include the residual and equal ``model.safetensors``; the
    checkpoint reloads without lrc with the same logits; a run killed after a block resumes to the same rows."""
    from conftest import reload_logits, resume_after_crash

    from compress.methods.eora.lrc_compensated import CompensatedLinear

    model = str(tiny_model_dir("llama"))
    recipe = _recipe(corpus_file, stages=(), bits=3, method="gptq", compensate={"rank": 4})
    out, report = api.compress(model, recipe, tmp_path / "a", cache_dir=tmp_path / "c", progress=False)
    wrapped = {n: m for n, m in out.named_modules() if isinstance(m, CompensatedLinear)}
    rows = report["quantization"]["rows"]
    assert len(wrapped) == len(rows) and all(isinstance(m.base, QuantLinear) and m.rank == 4
                                             for m in wrapped.values())
    assert all(r["rel_error"] < r["quant_error"] and r["compensated_rank"] == 4 for r in rows)
    sizes = safetensors_payload(tmp_path / "a" / "model.safetensors")
    for r in rows:
        assert r["bytes_after"] == sum(v for k, v in sizes.items() if k.startswith(r["name"] + ".")), r["name"]
        m = wrapped[r["name"]]
        assert r["residual_bytes"] == 4 * (m.in_features + m.out_features) * 4  # float32 model
    x = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reload_logits(tmp_path / "a", x, tmp_path), out(x).logits, atol=1e-5, rtol=0)
    again = resume_after_crash(monkeypatch, model, recipe, tmp_path / "b", tmp_path / "c2", tmp_path / "a")
    assert [r["bytes_after"] for r in again["quantization"]["rows"]] == [r["bytes_after"] for r in rows]
    assert [r["rel_error"] for r in again["quantization"]["rows"]] == pytest.approx([r["rel_error"] for r in rows])


def test_repair_is_eoras_closed_form():
    """``EoRA.repair`` on a quantized matrix: the residual's error is the tail of the whitened error spectrum, it
    falls with rank, and at full rank the weight is reproduced exactly on the inputs."""
    from compress.engine.quantize import compensated
    from compress.methods import METHODS
    from compress.methods.eora.math import residual_spectrum
    from compress.recipe import QuantizeConfig

    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24, bias=False).double().requires_grad_(False)
    X = torch.randn(200, 40, dtype=torch.float64) @ torch.randn(40, 40, dtype=torch.float64)
    H = X.T @ X
    cfg = QuantizeConfig(bits=3, group_size=8, method="rtn")
    from compress.engine.quantize import quantize_linear

    q, info = quantize_linear(lin, H, cfg)
    W = lin.weight.detach()
    sigma = residual_spectrum(W - q.weight_approx.double(), H)
    errs = []
    for rank in (1, 4, 12, 24):
        new, row = compensated(METHODS["eora"](), q, lin, H,
                               QuantizeConfig(bits=3, group_size=8, method="rtn", compensate={"rank": rank}), info)
        new.requires_grad_(False)
        rel = ((W - new.weight_approx.double()) @ X.T).norm() / (W @ X.T).norm()
        tail = (sigma[rank:].square().sum() / ((W @ X.T).norm() ** 2)).sqrt()
        assert row["rel_error"] == pytest.approx(float(rel), rel=1e-6) == pytest.approx(float(tail), rel=1e-6)
        errs.append(row["rel_error"])
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-8 and errs[0] < info["rel_error"]
    # the residual's factors quantized (int8, GPTQ): their error is measured on the module as written, still well
    # below the quantization error it repairs, and their bytes are the two QuantLinears'
    cfg8 = QuantizeConfig(bits=3, group_size=8, method="gptq", compensate={"rank": 12, "bits": 8})
    new, row = compensated(METHODS["eora"](), q, lin, H, cfg8, info)
    new.requires_grad_(False)
    rel = ((W - new.weight_approx.double()) @ X.T).norm() / (W @ X.T).norm()
    assert isinstance(new.lora_A, QuantLinear) and isinstance(new.lora_B, QuantLinear)
    assert row["rel_error"] == pytest.approx(float(rel), rel=1e-6) and row["rel_error"] < 0.5 * info["rel_error"]
    assert row["residual_bytes"] == new.lora_A.storage_bytes() + new.lora_B.storage_bytes()


def test_bench_in_bfloat16_runs_the_int4_kernel(tiny_model_dir, corpus_file, tmp_path):
    """``lrc bench --dtype bfloat16`` on a 4-bit checkpoint: every quantized matrix takes the int4 CPU kernel (the
    factors' ranks and 16-input groups included, padded where the shape needs it), and the weights at run time
    count what that path keeps beside the codes; float32 runs the dequantized path."""
    from typer.testing import CliRunner

    from compress.cli import app

    out, _ = api.compress(str(tiny_model_dir("llama")), _recipe(corpus_file, group_size=32), tmp_path / "a",
                          cache_dir=tmp_path / "c", progress=False)
    n = sum(isinstance(m, QuantLinear) for m in out.modules())
    for dtype, path in (("bfloat16", "int4_cpu"), ("float32", "dequantized")):
        res = CliRunner().invoke(app, ["bench", str(tmp_path / "a"), "--dtype", dtype, "--seq-lens", "8",
                                       "--decode-batches", "1", "--decode-tokens", "2", "--repeats", "1",
                                       "--json", str(tmp_path / "b.json")])
        assert res.exit_code == 0, res.output
        b = json.loads((tmp_path / "b.json").read_text())
        m = b["models"]["model"]
        assert b["dtype"] == dtype and m["quant_paths"] == {path: n}
        assert m["run_weights_gib"] > m["weights_gib"]
    res = CliRunner().invoke(app, ["bench", str(tmp_path / "a"), "--dtype", "int8"])
    assert res.exit_code != 0 and "--dtype: one of float32, bfloat16, float16; got 'int8'" in res.output
