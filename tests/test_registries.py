"""The registries behind the method protocol: allocators (one entry per name, what recipes validate against), cost
models (the one place a knob becomes parameters) and lrc's replacement module types (config specs and counts)."""
import json

import pytest
import torch
from torch import nn

from compress.allocation import (ALLOCATORS, COST_MODELS, DESCRIPTIONS, OPTIONS, SPECTRUM, cost_of,
                                 decide_from_spectrum, needs, register_allocator)
from compress.checkpoint.modeling_lrc import MODULE_TYPES, LowRankLinear
from compress.checkpoint.module_types import (ModuleType, is_unit, module_spec, register_module_type, unit_params,
                                              unit_weights, unregister_module_type)
from compress.methods.eora.lrc_compensated import CompensatedLinear
from compress.errors import LrcError
from compress.linalg import rank_for_ratio
from compress.plan import PlanRow, linear_units
from compress.recipe import parse_recipe

STAGE = {"method": "svd-llm", "param_ratio": 0.5}


def _parse(**stage):
    return parse_recipe({"stages": [{**STAGE, **stage}]})


def test_allocator_entries_and_the_views_derived_from_them():
    assert list(ALLOCATORS)[:5] == ["uniform", "energy", "welore", "loss", "sensitivity"]
    assert dict(SPECTRUM) == {n: e.reads for n, e in ALLOCATORS.items() if e.reads is not None}
    assert SPECTRUM.get("uniform") is None and "uniform" not in OPTIONS
    assert OPTIONS["welore"].__name__ == "WeLoreOptions"
    assert all(DESCRIPTIONS[n] == e.description and needs(n) == e.needs for n, e in ALLOCATORS.items())
    assert {n for n, e in ALLOCATORS.items() if "residual" in e.unit_kinds} >= {"uniform", "loss", "energy"}


def test_recipe_validates_allocator_and_options_against_the_registry():
    with pytest.raises(LrcError) as err:
        _parse(allocator="nope")
    assert str(err.value) == f"recipe: stages[0].allocator: unknown allocator 'nope'; registered: " \
                             f"{', '.join(sorted(ALLOCATORS))}"
    assert "energy, loss, sensitivity, uniform, welore" in str(err.value).replace("block_influence, ", "").replace(
        "search, ", "")
    with pytest.raises(LrcError, match=r"stages\[0\]\.allocator_options\.target: Input should be 'params' or 'rank'"):
        _parse(allocator="welore", allocator_options={"target": "bits"})
    with pytest.raises(LrcError, match="allocator energy takes no allocator_options"):
        _parse(allocator="energy", allocator_options={"x": 1})
    with pytest.raises(LrcError, match="allocator loss distributes a param_ratio budget"):
        _parse(allocator="loss", param_ratio=None, rank=4)
    with pytest.raises(LrcError, match="eora adds a residual: .* with the uniform, energy or loss allocator"):
        _parse(method="eora", allocator="welore", param_ratio=0.1)


def test_a_registered_allocator_is_usable_at_once():
    calls = []
    register_allocator("test-half", lambda stage, rows, spectra, options: calls.append(len(rows)), reads="weights",
                       description="test only")
    try:
        assert SPECTRUM["test-half"] == "weights" and needs("test-half").startswith("weight spectra")
        assert _parse(allocator="test-half").stages[0].allocator == "test-half"
        with pytest.raises(ValueError, match="reads 'nothing'"):
            register_allocator("test-bad", None, reads="nothing", description="")
        register_allocator("test-new", None, reads="nothing", description="", needs="something new")
        assert needs("test-new") == "something new"
    finally:
        ALLOCATORS.pop("test-half", None)
        ALLOCATORS.pop("test-new", None)
    assert "test-half" not in SPECTRUM


def _row(m=172, n=64, bias=False, align=1, **kw):
    return PlanRow("x", 0, "svd", 0, m, n, bias, None, None, align=align, **kw)


@pytest.mark.parametrize("m,n,bias,align", [(172, 64, False, 1), (64, 64, True, 8), (32, 64, False, 16),
                                            (3, 5, True, 4)])
def test_lowrank_cost_model(m, n, bias, align):
    row, cost = _row(m, n, bias, align), COST_MODELS["lowrank"]
    assert cost_of(row) is cost and row.cost_model == "lowrank"
    b = m if bias else 0
    for r in range(1, min(m, n) + 1):
        want = r * (m + n) + b if r * (m + n) < m * n else m * n + b
        assert cost.params(row, r) == want and cost.saves(row, r) == (r * (m + n) < m * n)
        assert cost.storage_bytes(row, r, 2) == 2 * want
    for f in (0.1, 0.5, 0.8, 1.0):
        assert cost.knob_for(row, f) == rank_for_ratio(m, n, f, align)
    best = cost.max_saving(row)
    assert best % align == 0 and (best == 0 or cost.saves(row, best)) and not cost.saves(row, best + align)


def test_plan_rows_count_through_their_cost_model():
    row = _row(172, 64, True)
    assert row.params_after is None and row.describe() == "rank ?"
    row.rank, row.factorize = 37, True
    assert row.params_after == 37 * (172 + 64) + 172 and row.describe() == "rank 37"
    row.rank, row.factorize = 60, False
    assert row.params_after == row.params_before == 172 * 64 + 172 and row.describe() == "rank 60 (kept dense)"
    comp = _row(64, 64, compensation=True, base_params=3200)
    assert comp.cost_model == "residual" and cost_of(comp) is COST_MODELS["residual"]
    comp.rank, comp.factorize = 4, True
    assert comp.params_after == 3200 + 4 * 128 and comp.describe() == "residual rank 4"
    assert COST_MODELS["residual"].knob_for(comp, 0.1) == rank_for_ratio(64, 64, 0.1)
    assert json.loads(json.dumps(row.to_dict()))["cost_model"] == "lowrank"


def test_decide_from_spectrum_keeps_the_energy_floor_and_leaves_decided_rows():
    class Stage:
        energy = 0.9

    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5] + [0.01] * 60, dtype=torch.float64)
    row = _row(64, 64, align=8)
    decide_from_spectrum(Stage, row, sigma)
    assert (row.rank, row.factorize) == (8, True)  # 2 directions hold 90%; rounded up to align
    row.rank = 5
    decide_from_spectrum(Stage, row, sigma)
    assert row.rank == 5


def _old_spec(m):
    """The isinstance chain ``engine/decompose.py`` had before the registry."""
    if isinstance(m, CompensatedLinear):
        return {"type": "compensated", "in_features": m.in_features, "out_features": m.out_features,
                "rank": m.rank, "base": _old_spec(m.base)}
    if isinstance(m, LowRankLinear):
        return {"type": "lowrank", "in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                "bias": m.second.bias is not None}
    return {"type": "dense", "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


def _block():
    block = nn.Module()
    block.q = LowRankLinear(16, 24, 4, bias=True)
    block.k = CompensatedLinear(LowRankLinear(16, 8, 3), 2)
    block.v = CompensatedLinear(nn.Linear(16, 8, bias=True), 5)
    block.o = nn.Linear(24, 16)
    block.mlp = nn.Sequential(nn.Linear(16, 40, bias=False), nn.ReLU(), LowRankLinear(40, 16, 6))
    return block


def test_unit_specs_are_byte_identical_to_the_old_ones():
    from compress.engine.decompose import lowrank_spec

    assert lowrank_spec is module_spec
    block = _block()
    for _, m in block.named_modules():
        if isinstance(m, (nn.Linear, LowRankLinear, CompensatedLinear)):
            assert json.dumps(module_spec(m)) == json.dumps(_old_spec(m))
    types = {module_spec(m)["type"] for m in (block.q, block.k, block.v, block.o)}
    assert types == {"lowrank", "compensated", "dense"} <= set(MODULE_TYPES)  # every spec the loader can build


def test_units_and_their_counts():
    block = _block()
    assert [n for n, _ in linear_units(block)] == ["q", "k", "v", "o", "mlp.0", "mlp.2"]
    assert is_unit(block.q) and is_unit(block.k) and not is_unit(block.o) and not is_unit(block.mlp)
    old = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))  # bench's count before
    assert sum(unit_weights(m) for _, m in linear_units(block)) == old
    assert unit_weights(block.k) == 3 * (16 + 8) + 2 * (16 + 8) and unit_params(block.q) == 4 * (16 + 24) + 24


def test_a_registered_unit_type_is_one_unit():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(4, 8)
            self.in_features = self.out_features = 8

    register_module_type(ModuleType("pair", Pair, None, lambda m: {"type": "pair"}, weights=lambda m: 1))
    try:
        block = nn.Module()
        block.p = Pair()
        assert [n for n, _ in linear_units(block)] == ["p"]
        assert module_spec(block.p) == {"type": "pair"} and unit_weights(block.p) == 1
    finally:
        unregister_module_type("pair")
    assert [n for n, _ in linear_units(block)] == ["p.a", "p.b"]
