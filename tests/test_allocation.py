"""Global rank allocation: every allocator meets the stage's parameter budget to within one rank step, no matrix
grows, WeLore's τ bisection converges on both of its targets, and lrc plan shows the chosen ranks."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from compress import compress_model
from compress.allocation.welore import kept_rank, normalised
from compress.cli import app
from compress.recipe import parse_recipe
from conftest import tiny_recipe

ARCHS = ["llama", "qwen2", "mistral"]


def _recipe(corpus, method, allocator, ratio, **aopts):
    data = tiny_recipe(corpus, method, param_ratio=ratio).model_dump(mode="json")
    data["stages"][0].update({"allocator": allocator, "allocator_options": aopts})
    return parse_recipe(data)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,allocator", [("svd-llm", "energy"), ("svd-llm", "welore"), ("svd-llm", "loss"),
                                              ("asvd", "energy"), ("asvd", "sensitivity")])
def test_budget_met_within_one_rank_step(arch, method, allocator, tiny_model_dir, tokenizer, corpus_file, tmp_path,
                                         monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch)).eval()
    ratio = 0.6
    aopts = {"ratios": [0.2, 0.5, 0.8], "samples": 2} if allocator == "sensitivity" else {}
    report = compress_model(model, _recipe(corpus_file, method, allocator, ratio, **aopts), tokenizer,
                            cache_dir=tmp_path)
    t = report["targeted"]
    step = max(r["out_features"] + r["in_features"] for r in report["modules"])
    assert t["params_after"] <= ratio * t["params_before"]
    assert ratio * t["params_before"] - t["params_after"] <= step  # within one rank step of the budget
    for r in report["modules"]:
        assert r["params_after"] <= r["params_before"]  # no matrix grows
        assert (r["type"] == "lowrank") == (r["rank"] is not None)
    ranks = {r["rank"] for r in report["modules"] if r["rank"]}
    assert len(ranks) > 2  # non-uniform
    assert torch.isfinite(model(torch.randint(0, len(tokenizer), (1, 8))).logits).all()


def test_welore_threshold_and_rank_target(tiny_model_dir, tokenizer, corpus_file, tmp_path):
    from types import SimpleNamespace

    from compress.allocation.welore import welore
    from compress.plan import PlanRow

    sig = torch.tensor([10.0, 5.0, 1.0, 0.0])
    assert torch.allclose(normalised(sig), torch.tensor([1.0, 0.5, 0.1, 0.0], dtype=torch.float64))
    assert kept_rank(normalised(sig), 0.2) == 2  # σ̃ = 0.1 and 0 fall below τ
    g = torch.Generator().manual_seed(0)
    rows = [PlanRow(f"m{i}", 0, "svd", i, 64, 48, False, None, None) for i in range(12)]
    spectra = {r.name: torch.sort(torch.rand(48, generator=g, dtype=torch.float64) ** (1 + i), descending=True)[0]
               for i, r in enumerate(rows)}
    for target, ratio in (("rank", 0.4), ("params", 0.5)):
        welore(SimpleNamespace(param_ratio=ratio), rows, spectra, {"target": target})
        if target == "rank":  # WeLore's own count: kept rank over total rank, dense N-LRC included at their rank
            kept, full = sum(r.rank for r in rows), 48 * len(rows)
            assert kept <= ratio * full and ratio * full - kept <= len(rows)
        else:
            after, before = sum(r.params_after for r in rows), sum(r.params_before for r in rows)
            assert after <= ratio * before and ratio * before - after <= 112
        assert len({r.rank for r in rows}) > 3  # heavy-tailed spectra lose more rank than flat ones
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    report = compress_model(model, _recipe(corpus_file, "svd", "welore", 0.7), tokenizer, cache_dir=tmp_path)
    labels = {r["note"].split(";")[0] for r in report["modules"]}
    assert labels <= {"LRC", "N-LRC"} and "LRC" in labels


def test_plan_shows_allocated_ranks(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "r.yaml"
    data = _recipe(corpus_file, "svd-llm", "energy", 0.6).model_dump(mode="json")
    import yaml

    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["plan", str(tiny_model_dir("llama")), "--recipe", str(path), "--all",
                                   "--json", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "p.json").read_text())
    assert all(r["rank"] for r in plan["modules"]) and plan["totals"]["kept_fraction_of_targeted"] <= 0.6
    assert "energy" in res.output


def test_global_allocator_needs_param_ratio(corpus_file):
    from compress.errors import LrcError

    data = tiny_recipe(corpus_file, rank=4).model_dump(mode="json")
    data["stages"][0]["allocator"] = "welore"
    with pytest.raises(LrcError, match="stages\\[0\\].*param_ratio"):
        parse_recipe(data)
    data["stages"][0].update({"rank": None, "param_ratio": 0.5, "allocator_options": {"target": "bits"}})
    with pytest.raises(LrcError, match="target"):
        parse_recipe(data)


def test_sensitivity_search_protects_the_sensitive_matrix():
    """STRS on a hand-made table: the matrix whose perplexity explodes when compressed keeps the most, and the
    result fits the budget within one rank step (the sweep's cache: the test below)."""
    from types import SimpleNamespace

    from compress.allocation.sensitivity import sensitivity
    from compress.plan import PlanRow

    rows = [PlanRow(f"m{i}", 0, "asvd", i, 64, 64, False, None, None) for i in range(4)]
    ratios = [0.2, 0.5, 0.8]
    table = {"m0": torch.tensor([900.0, 400.0, 30.0], dtype=torch.float64)}
    table.update({f"m{i}": torch.tensor([12.0, 11.0, 10.5], dtype=torch.float64) for i in range(1, 4)})
    stage = SimpleNamespace(param_ratio=0.5, align=1)
    sensitivity(stage, rows, table, {"ratios": ratios})
    assert rows[0].params_after > max(r.params_after for r in rows[1:])  # here it even stays dense
    after, before = sum(r.params_after for r in rows), sum(r.params_before for r in rows)
    assert after <= 0.5 * before and 0.5 * before - after <= 128


def test_sensitivity_sweep_is_cached_across_runs(tiny_model_dir, tokenizer, corpus_file, tmp_path, monkeypatch):
    """The STRS sweep (one whole-model forward per matrix and candidate ratio) is stored under
    ``$LRC_CACHE/sensitivity``: a second run of the same model, calibration and options, in a fresh run directory
    (so the run's own spectra cache cannot answer), makes no whole-model forward at all and allocates the same
    ranks. Whole-model forwards are counted by a hook on the model itself: the second run makes exactly the sweep's
    matrices x ratios fewer of them (the rest, the same in both runs, capture the first block's inputs)."""
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc"))
    ratios = [0.2, 0.5, 0.8]
    recipe = _recipe(corpus_file, "asvd", "sensitivity", 0.6, ratios=ratios, samples=2)
    ranks, forwards = [], []
    for run in ("first", "second"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
        calls = []
        model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(1), with_kwargs=True)
        report = compress_model(model, recipe, tokenizer, cache_dir=tmp_path / run)
        ranks.append({r["name"]: r["rank"] for r in report["modules"]})
        forwards.append(len(calls))
        assert list((tmp_path / "lrc" / "sensitivity").glob("*.safetensors"))
    assert forwards[0] - forwards[1] == 21 * len(ratios)  # 21 matrices x 3 ratios swept once, then not again
    assert forwards[1] < 21
    assert ranks[0] == ranks[1] and len(set(ranks[0].values())) > 1
