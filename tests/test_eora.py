"""EoRA's residual on random matrices: the optimum of ||(ΔW − BA)X|| among rank-r residuals, better than plain SVD
of ΔW on that objective, exact when r >= rank(ΔW), finite on a singular Gram."""
import json
import sys
from pathlib import Path

import pytest
import torch

from compress.methods.eora.math import eora_residual

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from rtn import rtn_quantize  # noqa: E402  (the benchmark's RTN baseline maker, shared with the test)


def _case(m=12, n=10, N=40, seed=0, gram_rank=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    Wc = W + 0.3 * torch.randn(m, n, generator=g, dtype=torch.float64)  # any compression error
    X = torch.randn(n, N, generator=g, dtype=torch.float64) * torch.logspace(0, 2, n, dtype=torch.float64)[:, None]
    if gram_rank is not None:
        X = torch.randn(n, gram_rank, generator=g, dtype=torch.float64) @ torch.randn(gram_rank, N, generator=g,
                                                                                      dtype=torch.float64)
    return W - Wc, X


def _obj(delta, BA, X):
    return float(torch.linalg.norm((delta - BA) @ X))


@pytest.mark.parametrize("m,n", [(12, 10), (6, 10)])
def test_residual_is_the_optimum_and_beats_plain_svd(m, n):
    delta, X = _case(m, n)
    r = 3
    res = eora_residual(delta, X @ X.T, r)
    best = _obj(delta, res.B @ res.A, X)
    assert best == pytest.approx(float(res.sigma[r:].square().sum().sqrt()), rel=1e-8)
    Xi = torch.linalg.pinv(X)  # brute force: the rank-r truncation of ΔW X, mapped back, is optimal
    U, s, Vh = torch.linalg.svd(delta @ X, full_matrices=False)
    assert best == pytest.approx(_obj(delta, (U[:, :r] * s[:r]) @ Vh[:r] @ Xi, X), rel=1e-6)
    U, s, Vh = torch.linalg.svd(delta, full_matrices=False)  # plain SVD of ΔW ignores the inputs
    assert best < _obj(delta, (U[:, :r] * s[:r]) @ Vh[:r], X)
    g = torch.Generator().manual_seed(3)
    for _ in range(100):
        Bp = res.B + 0.02 * torch.randn(res.B.shape, generator=g, dtype=torch.float64)
        assert _obj(delta, Bp @ res.A, X) >= best - 1e-9


def test_full_rank_residual_removes_the_error():
    delta, X = _case(8, 10)
    res = eora_residual(delta, X @ X.T, 8)
    assert _obj(delta, res.B @ res.A, X) < 1e-8 * float(torch.linalg.norm(delta @ X))
    assert res.relative_error() < 1e-8 and res.dropped == 0


def test_singular_gram_is_handled_and_counted():
    delta, X = _case(12, 10, gram_rank=4)
    res = eora_residual(delta, X @ X.T, 6)
    assert torch.isfinite(res.A).all() and torch.isfinite(res.B).all()
    assert res.dropped == 6  # 10 input directions, calibration spans 4
    assert _obj(delta, res.B @ res.A, X) < 1e-8 * float(torch.linalg.norm(delta @ X))  # 4 directions suffice
    assert float(torch.linalg.norm(res.A @ torch.linalg.svd(X)[0][:, 4:])) < 1e-8  # unseen directions untouched


ARCHS = ["llama", "qwen2", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("first", ["svd", "svd-llm"])
def test_eora_stage_after_a_decomposition_round_trips(arch, first, tiny_model_dir, tokenizer, corpus_file, tmp_path):
    """svd/svd-llm then eora on tiny GQA models: every module gains a residual, the error on calibration inputs
    falls, the parameter accounting adds exactly r(m+n) per module, and the checkpoint reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    from compress import api
    from compress.checkpoint.modeling_lrc import LowRankLinear
    from compress.methods.eora.lrc_compensated import CompensatedLinear
    from compress.recipe import parse_recipe
    from conftest import tiny_recipe

    data = tiny_recipe(corpus_file, first, param_ratio=0.5).model_dump(mode="json")
    data["stages"].append({"method": "eora", "rank": 4})
    out = tmp_path / "ck"
    model, report = api.compress(str(tiny_model_dir(arch)), parse_recipe(data), out, cache_dir=tmp_path / "c",
                                 progress=False)
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q, CompensatedLinear) and isinstance(q.base, LowRankLinear) and q.rank == 4
    rows = {(r["name"], r["stage"]): r for r in report["modules"]}
    names = {r["name"] for r in report["modules"]}
    assert report["targeted"]["modules"] == len(names) and report["targeted"]["compensated"] == len(names)
    for name in names:
        base, comp = rows[(name, 0)], rows[(name, 1)]
        assert comp["params_before"] == 0
        assert comp["params_after"] == 4 * (comp["out_features"] + comp["in_features"])
        assert comp["rel_error"] < comp["base_error"]  # same inputs: the residual repairs part of the error
        assert base["type"] in ("lowrank", "dense")
    assert report["targeted"]["params_after"] == sum(r["params_after"] for r in report["modules"])
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    x = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        assert torch.allclose(model.eval()(x).logits, reloaded(x).logits, atol=1e-5)


def test_eora_budget_rules(corpus_file):
    from compress.errors import LrcError
    from compress.recipe import parse_recipe
    from conftest import tiny_recipe

    data = tiny_recipe(corpus_file, "svd", param_ratio=0.5).model_dump(mode="json")
    data["stages"].append({"method": "eora", "energy": 0.9})
    with pytest.raises(LrcError, match="stages\\[1\\].*residual"):
        parse_recipe(data)
    data["stages"][1] = {"method": "svd-llm", "rank": 2}  # two decompositions of one module are still refused
    from compress.plan import make_plan

    with pytest.raises(LrcError, match="already compressed by stages\\[0\\]"):
        make_plan(_tiny_llama(), parse_recipe(data))


def _tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def rtn_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import STORIES

    if not STORIES.is_dir():
        pytest.skip(f"needs {STORIES} (../shared)")
    out = tmp_path_factory.mktemp("rtn") / "stories260k-rtn4"
    rtn_quantize(AutoModelForCausalLM.from_pretrained(STORIES), bits=4, group=32).save_pretrained(out)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(out)
    return out


def test_compensate_rtn_model_and_peft_export(rtn_dir, tmp_path, monkeypatch):
    """lrc compensate with rank 8 lowers a 4-bit RTN copy's perplexity toward dense; the PEFT adapter reproduces
    lrc's logits on the same base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from compress.cli import app
    from compress.eval.perplexity import perplexity
    from conftest import STORIES

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))
    text = (Path(__file__).parent / "data" / "tinystories_style.txt").read_text()
    tok = AutoTokenizer.from_pretrained(STORIES)
    args = ["compensate", str(STORIES), str(rtn_dir), "--rank", "8", "--calib", "selfgen", "--samples", "16",
            "--seq-len", "128"]
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "ck")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "adapter"), "--export", "peft"])
    assert res.exit_code == 0, res.output
    ppl = {name: perplexity(AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval(), tok, text,
                            seq_len=128).perplexity
           for name, path in (("dense", STORIES), ("rtn", rtn_dir), ("eora", tmp_path / "ck"))}
    assert ppl["dense"] < ppl["eora"] < ppl["rtn"]
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", trust_remote_code=True).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(rtn_dir), tmp_path / "adapter").eval()
    x = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, peft_model(x).logits, atol=1e-4)
    bad = CliRunner().invoke(app, ["compensate", str(STORIES), str(rtn_dir), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--rank" in bad.output

    # the same extra parameters as rank 8 everywhere (8·Σ(m+n) = 0.2041·Σm·n), spread by the loss allocator: lower
    # perplexity, non-uniform ranks, and a PEFT adapter (rank_pattern) that still reproduces lrc's logits
    args = [a for a in args if a not in ("--rank", "8")] + ["--param-ratio", "0.2041", "--allocator", "loss"]
    assert CliRunner().invoke(app, args + ["--out", str(tmp_path / "ck-loss")]).exit_code == 0
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "ad-loss"), "--export", "peft"])
    assert res.exit_code == 0, res.output
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ck-loss", trust_remote_code=True).eval()
    assert perplexity(ours, tok, text, seq_len=128).perplexity < ppl["eora"]
    report = json.loads((tmp_path / "ck-loss" / "lrc_report.json").read_text())
    extra = report["targeted"]["params_after"] - report["targeted"]["params_before"]
    assert extra <= 8 * sum(r["out_features"] + r["in_features"] for r in report["modules"])
    cfg = json.loads((tmp_path / "ad-loss" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and len(set(cfg["rank_pattern"].values()) | {cfg["r"]}) > 2
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(rtn_dir), tmp_path / "ad-loss").eval()
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, peft_model(x).logits, atol=1e-4)


def test_residual_spectrum_gives_the_loss_at_every_rank():
    from compress.methods.eora.math import residual_spectrum

    delta, X = _case(12, 10)
    sigma = residual_spectrum(delta, X @ X.T)
    for r in (1, 4, 9):
        res = eora_residual(delta, X @ X.T, r)
        assert _obj(delta, res.B @ res.A, X) ** 2 == pytest.approx(float(sigma[r:].square().sum()), rel=1e-6)


@pytest.mark.parametrize("allocator", ["loss", "energy"])
def test_global_allocation_of_residual_ranks(allocator, tiny_model_dir, corpus_file, tmp_path):
    """lrc compensate --param-ratio P --allocator loss|energy: ranks differ per module and the extra parameters meet
    P·Σm·n to within one rank step. energy: block 0's q/k/v (the same inputs in the pre-pass and the loop) repair at
    least the global energy fraction. A recipe that creates the residual in the same run is refused."""
    from compress import api
    from compress.errors import LrcError
    from compress.plan import make_plan
    from compress.recipe import parse_recipe
    from conftest import tiny_recipe

    dense = str(tiny_model_dir("qwen2"))
    api.compress(dense, tiny_recipe(corpus_file, "svd", param_ratio=0.5), tmp_path / "svd", cache_dir=tmp_path / "c",
                 progress=False)
    calib = {"dataset": str(corpus_file), "samples": 8, "seq_len": 32}
    _, report = api.compensate(dense, str(tmp_path / "svd"), tmp_path / "e", param_ratio=0.1, calibration=calib,
                               cache_dir=tmp_path / "c", progress=False, allocator=allocator)
    rows = report["modules"]
    extra = sum(r["rank"] * (r["out_features"] + r["in_features"]) for r in rows)
    budget = 0.1 * sum(r["out_features"] * r["in_features"] for r in rows)
    assert budget - max(r["out_features"] + r["in_features"] for r in rows) < extra <= budget
    assert len({r["rank"] for r in rows}) > 2
    if allocator == "energy":
        e = float(rows[0]["note"].split("energy ")[1].split()[0])
        for r in rows:
            if ".layers.0.self_attn." in r["name"] and "o_proj" not in r["name"]:  # inputs nothing changed yet
                assert 1 - (r["rel_error"] / r["base_error"]) ** 2 >= e - 1e-4, r["name"]
    data = tiny_recipe(corpus_file, "svd", param_ratio=0.5).model_dump(mode="json")
    data["stages"].append({"method": "eora", "param_ratio": 0.1, "allocator": allocator})
    with pytest.raises(LrcError, match=f"stages\\[1\\]: allocator {allocator} spreads residual ranks"):
        make_plan(_tiny_llama(), parse_recipe(data))


def test_residual_loss_allocation_is_the_greedy_optimum():
    """On random decaying spectra, the loss allocator's summed tail energy is the smallest over every allocation
    of the same budget (brute force over all rank vectors with at least rank 1 each)."""
    import itertools
    from types import SimpleNamespace

    from compress.allocation.residual import residual_loss

    g = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (5, 5), (8, 3)]
    rows = [SimpleNamespace(name=f"m{i}", out_features=m, in_features=n, align=1) for i, (m, n) in enumerate(shapes)]
    spectra = {r.name: torch.rand(min(r.out_features, r.in_features), generator=g, dtype=torch.float64)
               .sort(descending=True).values * (3 - i) for i, r in enumerate(rows)}
    stage = SimpleNamespace(param_ratio=0.8)
    residual_loss(stage, rows, spectra)
    budget = int(0.8 * sum(m * n for m, n in shapes))

    def tail(ranks):
        return sum(float(spectra[r.name][k:].square().sum()) for r, k in zip(rows, ranks))

    chosen = [r.rank for r in rows]
    assert sum(k * (m + n) for k, (m, n) in zip(chosen, shapes)) <= budget
    best = min(tail(ks) for ks in itertools.product(*(range(1, min(m, n) + 1) for m, n in shapes))
               if sum(k * (m + n) for k, (m, n) in zip(ks, shapes)) <= budget)
    assert tail(chosen) <= best + 1e-12  # greedy by gain per parameter (exact here; in general up to one step)


def test_compensate_refuses_a_resized_checkpoint_in_one_line(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """``lrc compensate DENSE MODEGPT_CKPT`` used to crash mid-run (modules matched by name, W − W_c of two
    shapes); it is refused before any work, naming the module, and writes nothing."""
    from typer.testing import CliRunner

    from compress import api
    from compress.cli import app
    from conftest import tiny_recipe

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))
    dense = tiny_model_dir("llama")
    api.compress(str(dense), tiny_recipe(corpus_file, method="modegpt", param_ratio=0.7), tmp_path / "modegpt",
                 cache_dir=tmp_path / "c", progress=False)
    res = CliRunner().invoke(app, ["compensate", str(dense), str(tmp_path / "modegpt"), "--rank", "2", "--calib",
                                   str(corpus_file), "--samples", "4", "--seq-len", "16", "--out",
                                   str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "EoRA repairs a module towards the dense module of the same shape" in res.output
    assert "EoRA repairs" in res.output.strip().splitlines()[-1] and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()
