"""``search`` allocator: LEMS's rank allocation as a multiple-choice knapsack (ICML 2026; methods.md §12).

**Error model** (§12, "Error model per Linear l"). From the method's whitened singular values ``s_i`` of matrix l:
``E(r) = Σ_{i≤r} s_i²``, ``E = Σ s_i²``, anchor rank ``r0 = int(0.1·r_eq)`` with ``r_eq = ⌊mn/(m+n)⌋``, and

    e_l(r) = (1 − E(r)/E) / max(1 − E(r0)/E, 1e-6)          (so e_l(r0) = 1)

One measured number anchors the curve: ``KL_l``, the mean per-token KL(p_dense ‖ p_l) of the whole model with only
matrix l replaced by its rank-``r0`` factors (``samples`` sequences, ``temperature`` on both logits, positions from
``min_position``; measured by the engine, which calls ``anchor_rank``). The predicted error is

    ε_l(r) = d(b_l) · KL_l · e_l(r),   d(b) = 1 + γ·(H(b) − H(B−1)) / (H(0) − H(B−1)),   H(b) = Σ_{j=b}^{B−1} (j+1)^{−α}

(``d = 1 + γ`` on the first block, 1 on the last: early blocks are predicted to hurt more).

**Candidates** per matrix: kept dense (its parameters, error 0) or ``r = k·r_eq`` for ``k`` from 0.3 (0.1 when the
kept ratio is below 0.5) to 0.95 in steps of 0.05, ``r`` a multiple of 8. **Program**: binary ``x_{l,j}``,
minimise ``Σ ε_{l,j} x_{l,j}`` with ``Σ_j x_{l,j} = 1`` per matrix and ``Σ c_{l,j} x_{l,j} ≤ ρ·Σ params_l``.
**Outer search**: ``(α, γ) ∈ [0, 3] × [0, 7]``, 10 seeded random trials, each solved, applied and measured (whole-model
KL on the search sequences); the allocation with the lowest measured KL wins.

**Across methods** (beyond LEMS, which ranks one decomposition): a group of stages (``methods: [modegpt, svd-llm]``
in a recipe) offers alternatives for the same modules. Each option acts on a set of modules — a Linear's rank on its
module, a block method's unit (MoDeGPT's MLP, q/k or v/o group) at a knob on all its members — and the program
(``solve_cover``) chooses options so that every module is covered exactly once, under one budget over the modules'
dense parameters. A unit's error curve is measured, not a spectrum's tail: its block's output error at a few kept
fractions (``UNIT_FRACTIONS``), normalised at the anchor knob, times its own measured KL anchor (the engine rebuilds
the unit with its method's hooks, on the dense block's statistics). With one method it is the plain search.

What lrc does differently or beyond the reference:

- the cost ``c_{l,j}`` is the row's cost model (``cost.py``: ``r(m+n)`` + bias for ``lowrank``), not ``k·mn``, and
  only ranks that save parameters under it are offered; the budget counts biases like every lrc allocator;
- the rank step is ``lcm(multiple, align)``, or the stage's ``align`` when a matrix is too small for it
  (``r_eq < 4·step``), so small models still get a grid;
- the program is solved exactly by HiGHS (``scipy.optimize.milp``, MIP gap 0) instead of Gurobi/CBC, and the integer
  total is re-checked against the budget;
- the first trial is always the fixed ``(alpha, gamma)`` (LEMS's config: 0, 5), so the search never measures worse
  than them; trials giving the same allocation are measured once, in ONE call of the engine's ``evaluate``;
- with ``trials: 0`` (or no ``evaluate``) it solves once with the fixed ``(alpha, gamma)``: no whole-model KL per trial.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import LrcError
from .bits import linear_bytes, unit_bytes
from .budget import set_rank
from .cost import cost_of
from .registry import register_allocator


class SearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.0, ge=0, description="fixed depth exponent α of H(b) = Σ_{j≥b} (j+1)^-α (LEMS config: 0); "
                                                "the only value with trials: 0, the first trial otherwise")
    gamma: float = Field(5.0, ge=0, description="fixed depth strength γ: d = 1 + γ on the first block, 1 on the last "
                                                "(LEMS config: 5; 0 = no depth term)")
    trials: int = Field(10, ge=0, description="outer-search trials, each solved and measured by whole-model KL "
                                              "(0: solve once with alpha/gamma, no measurement)")
    seed: int = Field(0, description="seed of the random (α, γ) trials after the first")
    alpha_range: tuple[float, float] = Field((0.0, 3.0), description="range of α in the outer search (LEMS: [0, 3])")
    gamma_range: tuple[float, float] = Field((0.0, 7.0), description="range of γ in the outer search (LEMS: [0, 7])")
    anchor_fraction: float = Field(0.1, gt=0, le=1, description="anchor rank r0 = int(fraction · r_eq), where each "
                                                                "matrix's KL is measured (LEMS: 0.1)")
    k_min: float | None = Field(None, gt=0, le=0.95, description="smallest candidate k = r / r_eq (None: 0.3, or "
                                                                 "0.1 when param_ratio < 0.5, as LEMS)")
    multiple: int = Field(8, ge=1, description="candidate ranks are multiples of this (and of the stage's align); "
                                               "the stage's align alone for matrices with r_eq < 4·multiple")
    time_limit: float = Field(60.0, gt=0, description="seconds HiGHS may spend on one knapsack (LEMS: 180 s Gurobi)")
    samples: int = Field(32, gt=0, description="calibration sequences of the KL anchors and of each trial's KL "
                                               "(LEMS: 32)")
    temperature: float = Field(0.6, gt=0, description="temperature on both logits of every KL (LEMS: 0.6)")
    min_position: int | None = Field(None, ge=0, description="KL counted from this token position on (None: "
                                                             "seq_len // 2; LEMS: positions >= 256 of 2048-token "
                                                             "windows, past the short-context start)")

    @model_validator(mode="after")
    def _ranges(self):
        for name in ("alpha_range", "gamma_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be [low, high] with 0 <= low <= high, got [{lo}, {hi}]")
        return self


@dataclass(frozen=True)
class Candidate:
    """One option of a matrix in the knapsack: ``knob`` (rank; None = kept dense), its ``params`` (cost model), its
    predicted ``error`` ε and ``k = rank / r_eq`` (1.0 for dense); under a byte budget also its width ``bits``
    (16: not quantized) and ``bytes`` (``bits.py``), the program's cost then."""

    knob: int | None
    params: int
    error: float
    k: float
    bits: int | None = None
    bytes: int | None = None

    @property
    def cost(self) -> int:
        return self.params if self.bytes is None else self.bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        return d if self.bits is not None else {k: v for k, v in d.items() if k not in ("bits", "bytes")}


# --- the error model (§12) -------------------------------------------------------------------------------------


def depth_multiplier(b: int, n_blocks: int, alpha: float, gamma: float) -> float:
    """``d(b) = 1 + γ·(H(b) − H(B−1)) / (H(0) − H(B−1))``, ``H(b) = Σ_{j=b}^{B−1} (j+1)^{−α}`` (LEMS, §12): ``1 + γ``
    on block 0, 1 on the last block, non-increasing in ``b``; 1 everywhere when ``γ = 0`` or ``B = 1``."""
    if gamma == 0 or n_blocks <= 1:
        return 1.0
    if not 0 <= b < n_blocks:
        raise ValueError(f"block {b} outside 0..{n_blocks - 1}")
    terms = [(j + 1) ** (-alpha) for j in range(n_blocks)]
    h_b, h_last, h_0 = sum(terms[b:]), terms[-1], sum(terms)
    return 1.0 + gamma * (h_b - h_last) / (h_0 - h_last)


def equal_rank(row) -> int:
    """``r_eq = ⌊mn/(m+n)⌋``: the rank whose factors store as many weights as the dense matrix."""
    m, n = row.out_features, row.in_features
    return m * n // (m + n)


def anchor_rank(row, anchor_fraction: float = 0.1) -> int:
    """``r0 = max(1, int(anchor_fraction · r_eq))`` aligned down to ``row.align`` (at least ``row.align``): the rank
    at which the engine measures the matrix's KL anchor (LEMS: 0.1)."""
    r0 = max(1, int(anchor_fraction * equal_rank(row)))
    return cost_of(row).align(row, r0)


def tail_curve(sigma: torch.Tensor) -> Callable[[int], float]:
    """``t(r) = 1 − E(r)/E`` with ``E(r) = Σ_{i≤r} s_i²``, clamped to [0, 1] (0 for a zero spectrum): the relative
    whitened error a rank-r truncation leaves."""
    s2 = torch.as_tensor(sigma).detach().to("cpu", torch.float64).flatten() ** 2
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(s2, 0)]).tolist()  # cum[r] = E(r)
    total = cum[-1]
    if total <= 0:
        return lambda r: 0.0
    return lambda r: min(max(1.0 - cum[min(max(int(r), 0), len(cum) - 1)] / total, 0.0), 1.0)


def error_curve(sigma: torch.Tensor, r0: int) -> Callable[[int], float]:
    """``e(r) = (1 − E(r)/E) / max(1 − E(r0)/E, 1e-6)`` with ``E(r) = Σ_{i≤r} s_i²`` (§12): 1 at ``r0``,
    non-increasing in ``r``, 0 from ``len(sigma)`` on. ``sigma``: the method's whitened singular values, descending
    (may be shorter than ``min(m, n)``; the missing ones are 0). A zero spectrum loses nothing: ``e ≡ 0``."""
    tail = tail_curve(sigma)
    den = max(tail(r0), 1e-6)
    return lambda r: tail(r) / den


# --- candidates -----------------------------------------------------------------------------------------------


def k_grid(k_min: float, k_max: float = 0.95, step: float = 0.05) -> list[float]:
    """``k_min, k_min + step, …`` up to ``k_max`` (rounded, so 0.95 is reached exactly)."""
    n = int(math.floor((k_max - k_min) / step + 1e-9))
    return [round(k_min + i * step, 10) for i in range(n + 1)]


def rank_step(row, multiple: int) -> int:
    """Candidate ranks' step: ``lcm(multiple, row.align)``, or ``row.align`` when ``r_eq < 4·step``."""
    step = math.lcm(multiple, row.align)
    return row.align if equal_rank(row) < 4 * step else step


def candidates(row, sigma: torch.Tensor, anchor_kl: float, depth: float, kept_ratio: float,
               options: SearchOptions | dict | None = None, widths=None) -> list[Candidate]:
    """The row's knapsack options (§12 "Candidates"): kept dense (``params_before``, error 0) first, then ranks
    ``r = k·r_eq`` (``k`` from ``k_min`` to 0.95 by 0.05, rounded down to ``rank_step``, at least ``row.align``,
    deduplicated, only those that save parameters under the row's cost model) with ``ε = depth·anchor_kl·e(r)``."""
    opts = SearchOptions.model_validate(options or {})
    k_min = opts.k_min if opts.k_min is not None else (0.1 if kept_ratio < 0.5 else 0.3)
    cost, r_eq, step = cost_of(row), equal_rank(row), rank_step(row, opts.multiple)
    e = error_curve(sigma, anchor_rank(row, opts.anchor_fraction))
    out = [Candidate(None, row.params_before, 0.0, 1.0)]
    seen = set()
    for k in k_grid(k_min):
        r = cost.align(row, max(int(k * r_eq) // step * step, row.align))
        if r in seen or not cost.saves(row, r):
            continue
        seen.add(r)
        out.append(Candidate(r, cost.params(row, r), float(depth * anchor_kl * e(r)), k))
    return out if widths is None else with_widths(row, out, sigma, depth * anchor_kl, widths, opts)


def with_widths(row, ranks: list[Candidate], sigma, scale: float, widths, opts) -> list[Candidate]:
    """A Linear row's options at every width of ``widths`` (``Widths``): each rank (and dense) at each width, priced
    in bytes (``bits.linear_bytes``), its error the truncation tail plus the quantization error on the energy kept,
    ``s·(t(r) + (1 − t(r))·q_f)`` (dense: ``s·q_d``), with ``s = depth·KL_l / t(r0)`` (``bits.py``'s model)."""
    if cost_of(row).name != "lowrank":
        raise LrcError(f"search: a byte budget prices low-rank Linears and MoDeGPT units; {row.name} has cost model "
                       f"{cost_of(row).name}")
    t = tail_curve(sigma)
    s = scale / max(t(anchor_rank(row, opts.anchor_fraction)), 1e-6)
    q = widths.errors(row.key)
    out = []
    for c in ranks:
        for b in widths.bits:
            spec = widths.spec(b)
            tr = 0.0 if c.knob is None else t(c.knob)
            qe = 0.0 if spec is None else q[b][0 if c.knob is None else 1]
            out.append(Candidate(c.knob, c.params, float(s * (tr + (1 - tr) * qe)), c.k, b,
                                 linear_bytes(row, c.knob, spec, widths.residual)))
    return pareto(out)


def pareto(options: list[Candidate]) -> list[Candidate]:
    """The options no other option beats on both bytes and error (ties: the first), cheapest first: a dominated
    one is never in an optimal choice (a narrow width can cost more than 16 bits at tiny ranks: a scale per row)."""
    out, best = [], math.inf
    for c in sorted(options, key=lambda c: (c.cost, c.error)):
        if c.error < best:
            out.append(c)
            best = c.error
    return out


# the kept fractions at which a unit's (block method's) output error is measured: its candidates' grid
UNIT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def unit_knobs(row, anchor_fraction: float = 0.1) -> list[int]:
    """The knobs of a unit row (a block method's group of modules) at which the engine measures its output error:
    the anchor knob (``anchor_fraction`` of its dims kept) first, then ``UNIT_FRACTIONS`` (deduplicated, only knobs
    that save parameters under its cost model)."""
    cost, out = cost_of(row), []
    for f in (anchor_fraction, *UNIT_FRACTIONS):
        k = cost.knob_for(row, f)
        if k not in out and (not out or cost.saves(row, k)):
            out.append(k)
    return out


def unit_candidates(row, curve: torch.Tensor, anchor_kl: float, depth: float, kept_ratio: float,
                    options: SearchOptions | dict | None = None, widths=None) -> list[Candidate]:
    """A unit row's options: kept dense, then each measured knob of ``curve`` (rows ``(knob, output error)``, the
    anchor knob first) with ``k`` = its kept share of parameters at least ``k_min`` and
    ``ε = depth·anchor_kl·err(knob)/err(anchor)`` — the method's own measured error curve in place of a spectrum's
    tail (the issue's "measured output error at a few knob values")."""
    opts = SearchOptions.model_validate(options or {})
    k_min = opts.k_min if opts.k_min is not None else (0.1 if kept_ratio < 0.5 else 0.3)
    cost = cost_of(row)
    pts = [(int(k), float(e)) for k, e in torch.as_tensor(curve).reshape(-1, 2).tolist()]
    den = max(pts[0][1], 1e-12) if pts else 1.0
    out = [Candidate(None, row.params_before, 0.0, 1.0)]
    for knob, err in pts:
        k = cost.params(row, knob) / row.params_before
        if k + 1e-9 < k_min or not cost.saves(row, knob) or any(c.knob == knob for c in out):
            continue
        out.append(Candidate(knob, cost.params(row, knob), float(depth * anchor_kl * err / den), round(k, 4)))
    if widths is None:
        return out
    measured = widths.unit_errors(row.key)  # (knob, bits) → output error with the unit's Linears at that width
    wide = []
    for c in out:
        for b in widths.bits:
            spec = widths.spec(b)
            err = c.error if spec is None else \
                depth * anchor_kl * measured[(row.dim if c.knob is None else c.knob, b)] / den
            wide.append(Candidate(c.knob, c.params, float(err), c.k, b, unit_bytes(c.params, spec)))
    return pareto(wide)


# --- the knapsack -----------------------------------------------------------------------------------------------


ERROR_SCALE = 1e6  # the largest error in the program HiGHS sees (see solve_mckp)


def _check_feasible(costs, budget: float) -> None:
    if any(len(g) == 0 for g in costs):
        raise ValueError("multiple-choice knapsack: a group has no options")
    cheapest = sum(min(g) for g in costs)
    if cheapest > budget:
        raise ValueError(f"multiple-choice knapsack infeasible: the cheapest choice of every group costs {cheapest}, "
                         f"over the budget {budget:.0f}")


def solve_mckp(costs: list[list[int]], errors: list[list[float]], budget: float, time_limit: float = 60) -> list[int]:
    """The exact multiple-choice knapsack (§12 "Program"): one option per group, ``Σ cost ≤ budget``, minimum
    ``Σ error``; the chosen option's index per group (``solve_cover`` with one item per group)."""
    _check_feasible(costs, budget)
    return solve_cover(costs, errors, [[g] for g in range(len(costs))], budget, time_limit)


def solve_cover(costs: list[list[int]], errors: list[list[float]], covers: list[list], budget: float,
                time_limit: float = 60) -> list[int | None]:
    """The program of a search across methods: group g's options all act on the items ``covers[g]`` (a Linear: its
    module; a unit: its member modules); every item is covered by exactly one chosen option of one group, so a
    group has one option chosen or none (another group covers its items); ``Σ cost ≤ budget``, minimum ``Σ error``.
    With one item per group it is the multiple-choice knapsack. Returns each group's chosen index or None.

    HiGHS via ``scipy.optimize.milp`` (binary x, one equality per item, one budget row, MIP gap 0). The errors are
    scaled to at most ``ERROR_SCALE``: HiGHS's absolute tolerances (gap 1e-6, dual feasibility 1e-7) then sit
    ~1e-12 below the largest error; scaled to 1 it returned non-optimal picks on about 1 in 20 random
    mixed-magnitude instances (the brute-force checks). The integer total is re-checked: a tolerance overshoot
    tightens the budget row and solves again. ``ValueError`` when no choice fits the budget (or HiGHS finds no
    solution in ``time_limit``)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    if len(costs) != len(errors) or len(costs) != len(covers) or \
            any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("costs, errors and covers must have the same groups and options (at least one each)")
    items = list(dict.fromkeys(i for cov in covers for i in cov))
    row_of = {i: k for k, i in enumerate(items)}
    sizes = [len(g) for g in costs]
    offsets = np.cumsum([0] + sizes)
    c = np.array([float(v) for g in errors for v in g])
    c = c * (ERROR_SCALE / (np.abs(c).max() or 1.0))
    w = np.array([float(v) for g in costs for v in g])
    n = len(c)
    r_idx, c_idx = [], []
    for g, cov in enumerate(covers):
        for i in dict.fromkeys(cov):
            r_idx += [row_of[i]] * sizes[g]
            c_idx += list(range(offsets[g], offsets[g + 1]))
    cover = csr_array((np.ones(len(r_idx)), (r_idx, c_idx)), shape=(len(items), n))
    limit = float(budget)
    for _ in range(5):
        res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(cover, 1, 1), LinearConstraint(w[None, :], -np.inf, limit)],
                   options={"time_limit": float(time_limit), "mip_rel_gap": 0})
        if res.status == 2 or (res.x is None and res.status == 1):
            raise ValueError(f"search program infeasible: no choice fits the budget {budget:.0f}")
        if res.x is None or res.status not in (0, 1):  # 1: time limit with a feasible solution (not proven optimal)
            raise ValueError(f"search program: HiGHS found no solution ({res.message})")
        pick = [None if res.x[offsets[g]:offsets[g + 1]].max() < 0.5 else
                int(np.argmax(res.x[offsets[g]:offsets[g + 1]])) for g in range(len(sizes))]
        over = sum(costs[g][j] for g, j in enumerate(pick) if j is not None) - budget
        if over <= 0:
            return pick
        limit -= over + 0.5  # HiGHS's feasibility tolerance let the integer total pass the budget
    raise ValueError(f"search program: HiGHS kept exceeding the budget {budget:.0f}")


def brute_force_mckp(costs: list[list[int]], errors: list[list[float]], budget: float) -> list[int]:
    """Every combination (small instances only, for tests): the cheapest-error choice within the budget."""
    _check_feasible(costs, budget)
    return brute_force_cover(costs, errors, [[g] for g in range(len(costs))], budget)


def brute_force_cover(costs, errors, covers, budget) -> list[int | None] | None:
    """``solve_cover`` by enumeration (small instances only, for tests); None when nothing fits."""
    best, best_err = None, math.inf
    items = set(i for cov in covers for i in cov)
    for pick in itertools.product(*([None, *range(len(g))] for g in costs)):
        chosen = [i for g, j in enumerate(pick) if j is not None for i in covers[g]]
        if len(chosen) != len(items) or set(chosen) != items:
            continue
        if sum(costs[g][j] for g, j in enumerate(pick) if j is not None) <= budget:
            err = sum(errors[g][j] for g, j in enumerate(pick) if j is not None)
            if err < best_err:
                best, best_err = list(pick), err
    return best


# --- the allocator --------------------------------------------------------------------------------------------


def trial_points(opts: SearchOptions, searching: bool) -> list[tuple[float, float]]:
    """The (α, γ) trials: the fixed pair first, then ``trials − 1`` seeded uniform draws from the ranges."""
    points = [(opts.alpha, opts.gamma)]
    if searching:
        rng = np.random.default_rng(opts.seed)
        for _ in range(opts.trials - 1):
            points.append((float(rng.uniform(*opts.alpha_range)), float(rng.uniform(*opts.gamma_range))))
    return points


def row_candidates(row, table, opts: SearchOptions, ratio: float, depth: float) -> list[Candidate]:
    """A row's options: a Linear's ranks from its spectrum, a unit's measured knobs from its curve."""
    widths = getattr(table, "widths", None)
    if getattr(row, "linear", True):
        return candidates(row, table.sigma[row.key], float(table.anchor[row.key]), depth, ratio, opts, widths)
    return unit_candidates(row, table.curve[row.key], float(table.anchor[row.key]), depth, ratio, opts, widths)


def dense_params(rows) -> dict[str, int]:
    """Each targeted module's dense parameters, once however many rows offer it (a unit's members not offered
    alone share the unit's remainder)."""
    out: dict[str, int] = {}
    for r in rows:
        if getattr(r, "linear", True):
            out[r.name] = r.params_before
    for r in rows:
        if not getattr(r, "linear", True):
            rest = [m for m in r.modules() if m not in out]
            known = sum(out[m] for m in r.modules() if m in out)
            for m in rest:
                out[m] = 0
            if rest:
                out[rest[0]] = r.params_before - known
    return out


def _solve_trial(rows, table, opts, ratio, n_blocks, budget, alpha, gamma):
    """One program at (α, γ): the rows' candidates, the chosen index per row (None: another row covers its
    modules) and the predicted total ε."""
    cands = [row_candidates(r, table, opts, ratio, depth_multiplier(r.block, n_blocks, alpha, gamma)) for r in rows]
    try:
        pick = solve_cover([[c.cost for c in g] for g in cands], [[c.error for c in g] for g in cands],
                           [r.modules() for r in rows], budget, opts.time_limit)
    except ValueError as err:
        what = "byte_ratio" if getattr(table, "widths", None) is not None else "param_ratio"
        raise LrcError(f"search allocator: {what} {ratio} cannot be met with its candidates ({err}); lower "
                       f"allocator_options.k_min") from err
    return cands, pick, sum(g[j].error for g, j in zip(cands, pick) if j is not None)


def search(stage, rows, table, options) -> None:
    """LEMS's allocation (§12), across methods when ``rows`` come from a stage group (alternatives for the same
    modules). ``table``: ``sigma`` (row key → whitened singular values; Linear rows), ``curve`` (row key →
    ``(knob, output error)`` rows; unit rows), ``anchor`` (row key → KL at its anchor), ``n_blocks``, and
    ``evaluate`` (a list of allocations, each row key → knob or None for dense, → one measured whole-model KL each;
    None: no outer search). Sets each chosen row's knob, writes the rows no option was chosen from to
    ``table.dropped`` (their modules are another method's) and ``table.result`` (trials, the chosen one, every
    row's candidates and choice) for the report."""
    opts = SearchOptions.model_validate(options or {})
    ratio, budget = search_budget(stage, rows, getattr(table, "widths", None))
    n_blocks = getattr(table, "n_blocks", None) or max(r.block for r in rows) + 1
    evaluate = getattr(table, "evaluate", None)
    searching = evaluate is not None and opts.trials > 0
    points = trial_points(opts, searching)
    solved = [_solve_trial(rows, table, opts, ratio, n_blocks, budget, a, g) for a, g in points]
    allocations, which = [], []
    for cands, pick, _ in solved:
        alloc = {r.key: None if j is None else g[j].knob if g[j].bits is None else [g[j].knob, g[j].bits]
                 for r, g, j in zip(rows, cands, pick)}
        if alloc not in allocations:
            allocations.append(alloc)
        which.append(allocations.index(alloc))
    measured = [None] * len(allocations)
    if searching:
        measured = [float(v) for v in evaluate(allocations)]
        if len(measured) != len(allocations):
            raise ValueError(f"search: evaluate returned {len(measured)} KLs for {len(allocations)} allocations")
    chosen = min(range(len(solved)), key=lambda t: (measured[which[t]] if searching else 0.0, t))
    cands, pick, _ = solved[chosen]
    table.dropped = set()
    for r, g, j in zip(rows, cands, pick):
        if j is None:
            table.dropped.add(r.key)
        else:
            _set(r, g[j])
    table.result = _result(rows, table, opts, points, solved, which, measured, chosen, budget, n_blocks, allocations)


def search_budget(stage, rows, widths) -> tuple[float, int]:
    """The stage's kept ratio and the program's budget: ``param_ratio`` of the modules' dense parameters, or
    ``byte_ratio`` of their 16-bit bytes (2 a value) under a byte budget (its ratio read as 0 for ``k_min``: every
    rank is offered, as narrow widths leave room for small ones)."""
    dense = sum(dense_params(rows).values())
    if widths is not None:
        return 0.0, int(stage.byte_ratio * 2 * dense)
    return stage.param_ratio, int(stage.param_ratio * dense)


def _set(row, c: Candidate) -> None:
    """The chosen option on its row: a rank (or dense) for a Linear, kept dims for a unit (all of them = dense);
    under a byte budget also its width (``row.bits``)."""
    row.bits = c.bits
    how = f"search: {row.method} " if getattr(row, "alternative", False) else "search: "
    if c.bits is not None:
        how += f"int{c.bits} " if c.bits < 16 else "16-bit "
    if not getattr(row, "linear", True):
        row.knob = c.knob if c.knob is not None else row.dim
        row.kept_fraction_target = round(c.k, 6)
        row.note = f"{how}{row.describe()}" + (f", predicted ε {c.error:.4g}" if c.knob is not None else
                                               " (kept dense)")
    elif c.knob is None:
        row.rank, row.factorize, row.note = None, False, f"{how}kept dense"
    else:
        set_rank(row, c.knob, f"{how}rank {c.knob} (k={c.k:.2f}), predicted ε {c.error:.4g}")


def _additive(rows, table, opts, allocations) -> list[float]:
    """LEMS's error model without the depth term, ``Σ_l KL_l·e_l(knob_l)`` (dense: 0), for each allocation: what
    the per-row anchors predict for the whole model, to set beside the KL measured for it."""
    errs = {r.key: {c.knob if c.bits is None else (c.knob, c.bits): c.error
                    for c in row_candidates(r, table, opts, 0.0, 1.0)} for r in rows}
    return [sum(errs[r.key][a[r.key] if not isinstance(a[r.key], list) else tuple(a[r.key])]
                for r in rows if a[r.key] is not None) for a in allocations]


def _result(rows, table, opts, points, solved, which, measured, chosen, budget, n_blocks, allocations) -> dict:
    """The search as JSON for the report: trials (α, γ, measured KL, predicted total ε), the chosen trial, and per
    row its method, anchor, depth multiplier, candidates and chosen index (None: not chosen; at the chosen trial's
    α, γ)."""
    cands, pick, _ = solved[chosen]
    alpha, gamma = points[chosen]
    additive = _additive(rows, table, opts, allocations)
    return {
        "budget": int(budget),
        "params": int(sum(g[j].params for g, j in zip(cands, pick) if j is not None)),
        **({"bytes": int(sum(g[j].bytes for g, j in zip(cands, pick) if j is not None)), "unit": "bytes"}
           if getattr(table, "widths", None) is not None else {}),
        "trials": [{"alpha": a, "gamma": g, "kl": measured[which[t]], "predicted": float(s[2]),
                    "allocation": which[t]} for t, ((a, g), s) in enumerate(zip(points, solved))],
        "chosen": chosen,
        "additive_kl": additive,
        "additive_rank_correlation": _spearman(additive, measured),
        "rows": {r.key: {"block": r.block, "method": r.method, "anchor_knob": _anchor_knob(r, opts),
                         "anchor_kl": float(table.anchor[r.key]),
                         "depth": depth_multiplier(r.block, n_blocks, alpha, gamma),
                         "candidates": [c.to_dict() for c in g], "chosen": j}
                 for r, g, j in zip(rows, cands, pick)},
    }


def _anchor_knob(row, opts) -> int:
    return anchor_rank(row, opts.anchor_fraction) if getattr(row, "linear", True) else \
        unit_knobs(row, opts.anchor_fraction)[0]


def _spearman(predicted: list[float], measured: list) -> float | None:
    """Spearman's rank correlation of the allocations' predicted error with their measured KL (None below three
    distinct measurements): how well the per-matrix error model orders whole allocations."""
    pairs = [(p, m) for p, m in zip(predicted, measured) if m is not None]
    if len({m for _, m in pairs}) < 3 or len({p for p, _ in pairs}) < 2:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr([p for p, _ in pairs], [m for _, m in pairs]).statistic)


register_allocator("search", search, reads="anchors", options=SearchOptions, block_units=True,
                   description="LEMS (ICML 2026, methods.md §12): ranks by an exact multiple-choice knapsack over "
                               "predicted errors (whitened spectrum × one measured KL per matrix × depth), "
                               "(α, γ) searched by measured whole-model KL; across methods with a stage's "
                               "methods: [...] (MoDeGPT units against Linears, one budget)")
