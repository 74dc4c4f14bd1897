"""The ``search`` allocator's math (LEMS, methods.md §12): the depth multiplier, the anchored error curve, the
candidate grid, the exact multiple-choice knapsack (HiGHS against brute force) and the allocator on hand-made rows:
budget met, less sensitive matrices compressed more, one ``evaluate`` call over distinct allocations, argmin taken."""
from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
import torch

from compress.allocation import ALLOCATORS, needs
from compress.allocation.search import (SearchOptions, anchor_rank, brute_force_mckp, candidates, depth_multiplier,
                                        equal_rank, error_curve, search, solve_mckp)
from compress.plan import PlanRow
from compress.recipe import parse_recipe


def _row(name: str, block: int = 0, m: int = 64, n: int = 48, align: int = 1) -> PlanRow:
    return PlanRow(name, 0, "svd-llm", block, m, n, False, None, None, align=align)


def _sigma(seed: int, n: int = 48, decay: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.rand(n, generator=g, dtype=torch.float64) ** (1 + decay), descending=True)[0]


# --- depth multiplier -----------------------------------------------------------------------------------------


def test_depth_multiplier_endpoints_monotone_and_flat_without_gamma():
    for alpha in (0.0, 0.5, 1.0, 3.0):
        for n_blocks in (1, 2, 5, 32):
            assert all(depth_multiplier(b, n_blocks, alpha, 0.0) == 1.0 for b in range(n_blocks))
        assert depth_multiplier(0, 1, alpha, 5.0) == 1.0  # B = 1: no division by zero
        for gamma in (0.5, 5.0, 7.0):
            d = [depth_multiplier(b, 12, alpha, gamma) for b in range(12)]
            assert d[0] == pytest.approx(1 + gamma) and d[-1] == pytest.approx(1.0)
            assert all(x >= y for x, y in zip(d, d[1:]))  # non-increasing with depth
            assert all(1.0 <= x <= 1 + gamma + 1e-12 for x in d)
    # α = 0: H(b) = B − b, so d is linear in b
    assert depth_multiplier(2, 5, 0.0, 4.0) == pytest.approx(1 + 4 * (3 - 1) / (5 - 1))
    # α > 0 puts the drop early: block 1 of 8 is already far below linear
    assert depth_multiplier(1, 8, 2.0, 1.0) < depth_multiplier(1, 8, 0.0, 1.0)


# --- anchor rank and error curve ------------------------------------------------------------------------------


def test_anchor_rank_is_a_tenth_of_r_eq_aligned_down():
    assert equal_rank(_row("a", m=64, n=48)) == 27
    assert anchor_rank(_row("a", m=64, n=48)) == 2
    assert anchor_rank(_row("a", m=4096, n=4096, align=8)) == 200  # int(0.1 · 2048) = 204 → 200
    assert anchor_rank(_row("a", m=4096, n=4096), 0.25) == 512
    assert anchor_rank(_row("a", m=8, n=8, align=8)) == 8  # never below align
    assert anchor_rank(_row("a", m=6, n=6)) == 1  # never below 1


def test_error_curve_anchored_at_r0_and_non_increasing():
    for seed in range(5):
        sigma = _sigma(seed, 40)
        for r0 in (1, 3, 10):
            e = error_curve(sigma, r0)
            assert e(r0) == 1.0
            vals = [e(r) for r in range(0, 60)]
            assert all(a >= b for a, b in zip(vals, vals[1:]))
            assert vals[40] == 0.0 and vals[59] == 0.0  # past the spectrum: nothing lost
            s2 = sigma ** 2
            assert e(20) == pytest.approx(float(s2[20:].sum() / s2[r0:].sum()))
    assert error_curve(torch.zeros(5), 2)(1) == 0.0  # a zero matrix loses nothing
    assert error_curve(torch.tensor([1.0, 0.0]), 1)(1) == 0.0  # r0 past the energy: the 1e-6 floor, no NaN


def test_candidates_grid_errors_and_costs():
    row = _row("a", m=512, n=256)  # r_eq = 170: step 8
    sigma = _sigma(0, 256)
    opts = SearchOptions()
    c = candidates(row, sigma, 0.2, 3.0, 0.8, opts)
    assert c[0].knob is None and c[0].params == row.params_before and c[0].error == 0.0
    ranks = [x.knob for x in c[1:]]
    assert ranks == sorted(set(ranks)) and all(r % 8 == 0 for r in ranks)
    assert ranks[0] == int(0.3 * 170) // 8 * 8 and ranks[-1] == int(0.95 * 170) // 8 * 8
    assert all(x.params == x.knob * (512 + 256) < row.params_before for x in c[1:])
    e = error_curve(sigma, anchor_rank(row))
    assert all(x.error == pytest.approx(3.0 * 0.2 * e(x.knob)) for x in c[1:])
    errs = [x.error for x in c[1:]]
    assert all(a >= b for a, b in zip(errs, errs[1:]))
    # ε(r0) = depth · KL exactly: a grid whose first k is the anchor fraction
    big = _row("b", m=4096, n=4096, align=8)
    low = candidates(big, _sigma(1, 4096), 0.05, 2.5, 0.4, SearchOptions(k_min=0.1, multiple=8))
    assert low[1].knob == anchor_rank(big) == 200 and low[1].error == 2.5 * 0.05
    assert candidates(big, _sigma(1, 4096), 0.05, 1, 0.4, opts)[1].k == 0.1  # auto k_min below ratio 0.5
    # a small matrix (r_eq < 4·8) steps by its align instead; only saving ranks are offered
    small = _row("c", m=24, n=16)  # r_eq = 9
    sc = candidates(small, _sigma(2, 16), 0.1, 1, 0.8, opts)
    assert [x.knob for x in sc[1:]] == [2, 3, 4, 5, 6, 7, 8]
    tiny = _row("d", m=8, n=8, align=8)  # its smallest aligned rank saves nothing: dense is its only option
    assert [x.knob for x in candidates(tiny, _sigma(3, 8), 0.1, 1, 0.8, opts)] == [None]


# --- the knapsack ---------------------------------------------------------------------------------------------


def _objective(errors, pick):
    return sum(errors[g][j] for g, j in enumerate(pick))


def test_solver_equals_brute_force_on_random_instances():
    rng = random.Random(0)
    for _ in range(30):
        groups = rng.randint(3, 5)
        costs = [[rng.randint(1, 100) for _ in range(rng.randint(2, 5))] for _ in range(groups)]
        errors = [[rng.random() * rng.choice([1e-4, 1.0, 50.0]) for _ in g] for g in costs]
        lo, hi = sum(min(g) for g in costs), sum(max(g) for g in costs)
        budget = rng.uniform(lo, hi)
        pick = solve_mckp(costs, errors, budget)
        best = brute_force_mckp(costs, errors, budget)
        assert len(pick) == groups and all(0 <= j < len(g) for j, g in zip(pick, costs))
        assert sum(costs[g][j] for g, j in enumerate(pick)) <= budget
        assert _objective(errors, pick) == pytest.approx(_objective(errors, best), rel=1e-9, abs=1e-15)


def test_solver_raises_when_infeasible_and_picks_the_best_affordable():
    with pytest.raises(ValueError, match="infeasible"):
        solve_mckp([[5, 9], [4, 7]], [[1, 0], [1, 0]], 8.5)
    # one group, dense (cost 100, error 0) out of reach: the lowest-error option that fits
    costs, errors = [[100, 30, 50, 70]], [[0.0, 0.9, 0.5, 0.2]]
    assert solve_mckp(costs, errors, 60) == [2]
    assert solve_mckp(costs, errors, 100) == [0]
    assert solve_mckp(costs, errors, 30) == [1]
    # large integer costs (an 8B model's matrices): the integer total still holds
    rng = random.Random(1)
    costs = [[4096 * 4096] + [r * 8192 for r in (512, 1024, 1536)] for _ in range(40)]
    errors = [[0.0] + sorted((rng.random() for _ in range(3)), reverse=True) for _ in range(40)]
    budget = 0.6 * 40 * 4096 * 4096
    pick = solve_mckp(costs, errors, budget)
    assert sum(costs[g][j] for g, j in enumerate(pick)) <= budget


# --- the allocator --------------------------------------------------------------------------------------------


def _table(rows, anchors, evaluate=None, decay=None):
    sigma = {r.name: _sigma(i, min(r.out_features, r.in_features), (decay or {}).get(r.name, 1.0))
             for i, r in enumerate(rows)}
    return SimpleNamespace(sigma=sigma, anchor=anchors, n_blocks=max(r.block for r in rows) + 1, evaluate=evaluate)


def _params(rows):
    return sum(r.params_after for r in rows)


def test_allocator_meets_budget_and_compresses_insensitive_rows_more():
    rows = [_row(f"m{i}", block=0, m=256, n=256) for i in range(6)]
    anchors = {f"m{i}": 0.01 * 3 ** i for i in range(6)}  # m0 the least sensitive
    table = _table(rows, anchors)
    table.sigma = {r.name: _sigma(0, 256) for r in rows}  # same spectrum: only the anchor KL differs
    stage = SimpleNamespace(param_ratio=0.5, align=1)
    search(stage, rows, table, {"trials": 0, "gamma": 0.0})
    assert _params(rows) <= 0.5 * sum(r.params_before for r in rows)
    kept = [r.params_after for r in rows]
    assert kept == sorted(kept) and kept[0] < kept[-1]
    assert all(r.note.startswith("search: ") for r in rows)
    res = table.result
    assert res["params"] == _params(rows) <= res["budget"] and len(res["trials"]) == 1
    assert res["trials"][0]["kl"] is None and res["chosen"] == 0
    for r in rows:
        info = res["rows"][r.name]
        chosen = info["candidates"][info["chosen"]]
        assert chosen["knob"] == (r.rank if r.factorize else None)


def test_allocator_can_keep_a_matrix_dense():
    rows = [_row("hot", m=128, n=128), _row("cold", m=128, n=128)]
    table = _table(rows, {"hot": 100.0, "cold": 0.001})
    search(SimpleNamespace(param_ratio=0.65, align=1), rows, table, {"trials": 0})
    assert rows[0].factorize is False and rows[0].rank is None and rows[0].note == "search: kept dense"
    assert rows[1].factorize and _params(rows) <= 0.65 * 2 * 128 * 128


def test_outer_search_evaluates_distinct_allocations_once_and_takes_the_argmin():
    rows = [_row(f"b{b}.{k}", block=b, m=192, n=160) for b in range(4) for k in range(2)]
    anchors = {r.name: 0.05 * (1 + (i % 3)) for i, r in enumerate(rows)}
    calls = []

    def evaluate(allocations):
        calls.append(allocations)
        # measured KL prefers the allocation giving the LAST block the most (not what the fixed γ = 5 predicts)
        return [-sum((a[r.name] or 200) for r in rows if r.block == 3) for a in allocations]

    table = _table(rows, anchors, evaluate)
    stage = SimpleNamespace(param_ratio=0.55, align=1)
    search(stage, rows, table, {"trials": 8, "seed": 3})
    assert len(calls) == 1
    allocs = calls[0]
    keys = [tuple(sorted(a.items(), key=lambda kv: kv[0])) for a in allocs]
    assert len(set(keys)) == len(keys) >= 2  # distinct, and the trials did differ
    kls = evaluate(allocs)
    best = allocs[min(range(len(allocs)), key=kls.__getitem__)]
    assert {r.name: (r.rank if r.factorize else None) for r in rows} == best
    res = table.result
    assert len(res["trials"]) == 8 and (res["trials"][0]["alpha"], res["trials"][0]["gamma"]) == (0.0, 5.0)
    assert res["trials"][res["chosen"]]["kl"] == min(kls)
    assert all(t["kl"] == kls[t["allocation"]] for t in res["trials"])
    assert _params(rows) <= 0.55 * sum(r.params_before for r in rows)
    # the same search is reproducible from its seed
    again = [_row(r.name, r.block, 192, 160) for r in rows]
    search(stage, again, _table(again, anchors, evaluate), {"trials": 8, "seed": 3})
    assert [r.rank for r in again] == [r.rank for r in rows]


def test_without_depth_it_is_a_plain_rank_search():
    """γ = 0: the allocation is the brute-force minimum of Σ KL_l·e_l(r_l) over the candidate grid within budget."""
    rows = [_row("a", m=96, n=64), _row("b", m=64, n=64, block=1), _row("c", m=80, n=48, block=2)]
    anchors = {"a": 0.3, "b": 0.02, "c": 0.1}
    table = _table(rows, anchors, decay={"a": 0.2, "b": 3.0, "c": 1.0})
    stage = SimpleNamespace(param_ratio=0.45, align=1)
    search(stage, rows, table, {"trials": 0, "gamma": 0.0, "multiple": 4})
    grids = [candidates(r, table.sigma[r.name], anchors[r.name], 1.0, 0.45, SearchOptions(multiple=4))
             for r in rows]
    budget = int(0.45 * sum(r.params_before for r in rows))
    best = min((combo for combo in itertools.product(*grids) if sum(c.params for c in combo) <= budget),
               key=lambda combo: sum(anchors[r.name] * error_curve(table.sigma[r.name], anchor_rank(r))(c.knob)
                                     if c.knob else 0.0 for r, c in zip(rows, combo)))
    assert [r.rank if r.factorize else None for r in rows] == [c.knob for c in best]
    assert len({r.rank for r in rows}) > 1


def test_allocator_reports_an_unreachable_budget():
    from compress.errors import LrcError

    rows = [_row("a", m=256, n=256)]
    with pytest.raises(LrcError, match="k_min"):
        search(SimpleNamespace(param_ratio=0.05, align=1), rows, _table(rows, {"a": 1.0}), {"trials": 0})


def test_registered_and_accepted_by_recipes():
    entry = ALLOCATORS["search"]
    assert entry.reads == "anchors" and entry.is_global and entry.options is SearchOptions
    assert needs("search").startswith("whitened spectra + a measured KL") and "§12" in entry.description
    recipe = parse_recipe({"stages": [{"method": "svd-llm", "param_ratio": 0.6, "allocator": "search",
                                       "allocator_options": {"trials": 4, "gamma_range": [0, 3]}}]})
    assert recipe.stages[0].allocator == "search"
    opts = entry.check_options(recipe.stages[0].allocator_options)
    assert opts.trials == 4 and opts.samples == 32 and opts.temperature == 0.6 and opts.min_position is None
    from compress.errors import LrcError

    with pytest.raises(LrcError, match="param_ratio"):
        parse_recipe({"stages": [{"method": "svd-llm", "rank": 8, "allocator": "search"}]})
    with pytest.raises(LrcError, match="gamma_range"):
        parse_recipe({"stages": [{"method": "svd-llm", "param_ratio": 0.6, "allocator": "search",
                                  "allocator_options": {"gamma_range": [3, 1]}}]})
    with pytest.raises(LrcError, match="bogus"):
        parse_recipe({"stages": [{"method": "svd-llm", "param_ratio": 0.6, "allocator": "search",
                                  "allocator_options": {"bogus": 1}}]})


# --- across methods: options covering sets of modules --------------------------------------------------------


def test_cover_solver_equals_brute_force_with_units_over_several_modules():
    """Groups act on sets of items (a unit on its members, a Linear on its module); every item covered once."""
    from compress.allocation.search import brute_force_cover, solve_cover

    rng = random.Random(1)
    for _ in range(40):
        items = list(range(rng.randint(2, 4)))
        covers = [[i] for i in items]  # each module offered alone (dense first)
        covers += [rng.sample(items, rng.randint(2, len(items))) for _ in range(rng.randint(1, 2))]  # units
        costs = [[rng.randint(20, 40)] + [rng.randint(1, 30) for _ in range(rng.randint(1, 3))] for _ in covers]
        for g, cov in enumerate(covers):
            if len(cov) > 1:  # a unit's dense option costs what its members do
                costs[g][0] = 40 * len(cov)
        errors = [[0.0] + [rng.random() * rng.choice([1e-3, 1.0, 30.0]) for _ in g[1:]] for g in costs]
        budget = rng.uniform(0.3, 0.9) * 40 * len(items)
        best = brute_force_cover(costs, errors, covers, budget)
        if best is None:
            continue
        pick = solve_cover(costs, errors, covers, budget)
        covered = [i for g, j in enumerate(pick) if j is not None for i in covers[g]]
        assert sorted(covered) == items  # each module exactly once
        assert sum(costs[g][j] for g, j in enumerate(pick) if j is not None) <= budget
        obj = sum(errors[g][j] for g, j in enumerate(pick) if j is not None)
        assert obj == pytest.approx(sum(errors[g][j] for g, j in enumerate(best) if j is not None), abs=1e-12)


def _unit(name="u", block=0):
    from compress.methods.modegpt.rows import UnitRow

    # an MLP-like unit over three modules: 3·64 parameters per kept neuron of 96
    return UnitRow(name, 0, "modegpt", block, "mlp", {"gate": f"{name}.g", "up": f"{name}.u", "down": f"{name}.d"},
                   96, 1, 3 * 64, 0, 3 * 64 * 96)


def test_unit_candidates_follow_the_measured_curve():
    from compress.allocation.search import unit_candidates, unit_knobs

    row = _unit()
    knobs = unit_knobs(row)
    assert knobs[0] == 10 and knobs == sorted(knobs) and knobs[-1] < row.dim  # anchor ⌈0.1·96⌉ first
    errs = [1.0 / (1 + k) for k in knobs]
    curve = torch.tensor(list(zip(knobs, errs)), dtype=torch.float64)
    cands = unit_candidates(row, curve, anchor_kl=0.2, depth=2.0, kept_ratio=0.4, options={"k_min": 0.1})
    assert cands[0].knob is None and cands[0].error == 0 and cands[0].params == row.params_before
    anchor = next(c for c in cands if c.knob == knobs[0])
    assert anchor.error == pytest.approx(2.0 * 0.2)  # ε(anchor) = depth · KL
    for c in cands[1:]:
        assert c.error == pytest.approx(2.0 * 0.2 * (1 / (1 + c.knob)) / errs[0])
        assert c.params == 3 * 64 * c.knob
    high = unit_candidates(row, curve, 0.2, 1.0, 0.8)  # k_min 0.3 above a ratio of 0.5
    assert all(c.k >= 0.3 for c in high[1:])


def test_allocator_chooses_a_unit_or_its_members_never_both():
    """A unit and Linear rows for its three members: each module ends covered once; with the unit's anchor KL tiny it
    takes the unit (the Linear rows dropped), with it huge the Linears (the unit dropped)."""
    from compress.allocation.search import dense_params, unit_knobs

    unit = _unit()
    rows_lin = [PlanRow(f"u.{m}", 0, "svd-llm", 0, o, i, False, None, None)
                for m, o, i in (("g", 96, 64), ("u", 96, 64), ("d", 64, 96))]
    for r in rows_lin:
        r.alternative = True
    rows = [unit, *rows_lin]
    assert sum(dense_params(rows).values()) == unit.params_before
    knobs = unit_knobs(unit)
    for unit_kl, want_unit in ((1e-6, True), (1e3, False)):  # the unit's measured anchor KL sets its scale
        table = SimpleNamespace(sigma={r.key: _sigma(3, 64) for r in rows_lin},
                                curve={unit.key: torch.tensor([[k, (96 - k) / 86] for k in knobs],
                                                              dtype=torch.float64)},
                                anchor={**{r.key: 0.1 for r in rows_lin}, unit.key: unit_kl}, n_blocks=1)
        search(SimpleNamespace(param_ratio=0.6, align=1), rows, table, {"trials": 0, "gamma": 0.0})
        res = table.result
        assert res["params"] <= res["budget"] == int(0.6 * unit.params_before)
        chosen = {k for k, v in res["rows"].items() if v["chosen"] is not None}
        if want_unit:
            assert chosen == {unit.key} and table.dropped == {r.key for r in rows_lin}
            assert unit.knob < unit.dim
        else:
            assert chosen == {r.key for r in rows_lin} and table.dropped == {unit.key}
            assert all(r.factorize for r in rows_lin)
