"""Which modules each stage compresses and at which rank, before any data is seen (``lrc plan``).

Targets default to every ``nn.Linear`` inside the decoder blocks (embeddings and lm_head are never targeted, nor
are mixture-of-experts routers: ``is_router``). Experts stored as fused 3-D parameters (transformers 5's Mixtral,
Qwen2/3-MoE, GPT-OSS) are no Linears: a stage whose targets cover them is refused here, before any work, rather than
leaving them dense without a word (``fused_experts``). Ranks come from the stage's allocator; ``uniform`` applies
``r = floor(ρ·m·n/(m+n))`` per matrix (GQA-correct: k/v projections get their own, smaller rank). A matrix whose
rank would not save parameters stays dense.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from torch import nn

from .allocation import allocate, cost_of
from .checkpoint.module_types import unit_params
from .errors import LrcError
from .recipe import Recipe
from .roles import find_blocks


@dataclass
class PlanRow:
    """One targeted matrix: its shape, the chosen rank (None = decided from data) and the resulting parameters, which
    its cost model (``allocation/cost.py``; a compensation row's is ``residual``) computes."""

    name: str
    stage: int
    method: str
    block: int
    out_features: int
    in_features: int
    bias: bool
    rank: int | None
    factorize: bool | None
    note: str = ""
    compensation: bool = False  # a residual of ``rank`` added to the module (EoRA)
    standalone: bool = True  # False when an earlier stage already counts this module's parameters
    base_params: int | None = None  # parameters of an already-compressed module (None: a dense Linear)
    align: int = 1  # the stage's ``align``: every allocator rounds this row's rank to a multiple of it
    cost_model: str = "lowrank"  # name in allocation.COST_MODELS: parameters at a rank
    cost_args: dict = field(default_factory=dict)  # what that cost model reads besides the shape (CoSpaDi's k/s)
    alternative: bool = False  # one of a stage group's options for this module (``key`` then names the method)
    bits: int | None = None  # a byte-budget search's bit width for this module (16: not quantized; None: quantize.bits)

    def __post_init__(self):
        if self.compensation and self.cost_model == "lowrank":
            self.cost_model = "residual"

    @property
    def params_before(self) -> int:
        if not self.standalone:
            return 0
        if self.base_params is not None:
            return self.base_params
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)

    @property
    def params_after(self) -> int | None:
        if self.factorize is None:
            return None
        if not self.factorize and not self.compensation:
            return self.params_before
        return cost_of(self).params(self, self.rank)

    linear = True  # one Linear whose knob is its rank (a unit row of a block method acts on several modules)

    @property
    def knob(self) -> int | None:
        """The allocator's knob (every plan row has one): a Linear's rank (atoms for a dictionary)."""
        return self.rank

    def modules(self) -> list[str]:
        """The full names of the modules this row acts on."""
        return [self.name]

    @property
    def key(self) -> str:
        """The row's name in the allocators' tables: ``name``, or ``name@method`` for an alternative (a module
        offered by several stages of a group has one row per method)."""
        return f"{self.name}@{self.method}" if self.alternative else self.name

    def describe(self) -> str:
        """The knob in words (``rank 123``), from the cost model."""
        return cost_of(self).describe(self)

    def to_dict(self) -> dict:
        d = {**asdict(self), "params_before": self.params_before, "params_after": self.params_after}
        if not self.cost_args:
            del d["cost_args"]
        if not self.alternative:
            del d["alternative"]
        if self.bits is None:
            del d["bits"]
        return d


def linear_units(block: nn.Module):
    """``(name, module)`` of every Linear-like unit: ``nn.Linear``, or an lrc replacement module as a whole (its
    inner Linears are not units of their own; ``checkpoint/module_types.py``)."""
    from .checkpoint.module_types import is_unit

    skip: list[str] = []
    for sub, mod in block.named_modules():
        if any(sub.startswith(p + ".") for p in skip):
            continue
        if is_unit(mod):
            skip.append(sub)
            yield sub, mod
        elif isinstance(mod, nn.Linear):
            yield sub, mod


EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def expert_counts(config) -> set[int]:
    """The number(s) of experts a config declares (the attribute's name varies by architecture); empty if dense."""
    return {v for k in EXPERT_COUNTS if isinstance(v := getattr(config, k, None), int) and v > 1}


def is_router(mod: nn.Module, experts: set[int]) -> bool:
    """A Linear that scores experts rather than transforms features, hence never compressed: one output per expert
    (Mixtral's ``gate`` before transformers 5, remote-code routers: out_features = the config's expert count), or a
    single output (Qwen2-MoE's ``shared_expert_gate``). Its outputs go through a top-k or a sigmoid that a low-rank
    error would reshuffle, and it is tiny; a one-output Linear never saves parameters when factorised anyway.
    Judged by shape, as routers have no common class or name."""
    return isinstance(mod, nn.Linear) and (mod.out_features == 1 or mod.out_features in experts)


def fused_experts(block: nn.Module, experts: set[int]):
    """``(sub, module, parameter names)`` of modules holding experts as 3-D parameters (experts x out x in): one
    whose 3-D weight's leading size is the config's expert count, or whose class name says experts (convolution
    kernels, also 3-D, are not)."""
    for sub, mod in block.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            continue
        names = [k for k, p in mod.named_parameters(recurse=False) if p.dim() == 3 and
                 (p.shape[0] in experts or "expert" in type(mod).__name__.lower())]
        if names:
            yield sub, mod, names


def wanted(name: str, targets: list[re.Pattern] | None, ignore: list[re.Pattern]) -> bool:
    """Whether a module's full ``name`` matches ``targets`` (None: every module) and none of ``ignore``."""
    return (targets is None or any(t.search(name) for t in targets)) and not any(t.search(name) for t in ignore)


def stage_targets(model: nn.Module, recipe: Recipe) -> list[tuple[int, str, int, nn.Linear]]:
    """``(stage, name, block, module)`` for every targeted Linear; a module may belong to one stage only."""
    from .methods import METHODS

    prefix, blocks = find_blocks(model)
    experts = expert_counts(model.config)
    owner: dict[str, int] = {}
    out = []
    for si, stage in enumerate(recipe.stages):
        if METHODS[stage.method].unit == "block":  # groups of modules by role: plan_units.unit_rows
            continue
        compensation = METHODS[stage.method].kind == "compensation"
        try:
            targets = [re.compile(t) for t in stage.targets] if stage.targets else None
            ignore = [re.compile(t) for t in stage.ignore]
        except re.error as err:
            raise LrcError(f"stages[{si}].targets/ignore: bad regex ({err})") from None
        hits = 0
        for bi, block in enumerate(blocks):
            for sub, mod, params in fused_experts(block, experts):
                name = f"{prefix}.{bi}.{sub}"
                if any(wanted(n, targets, ignore) for n in (name, *(f"{name}.{p}" for p in params))):
                    raise LrcError(f"{name}: fused 3-D expert weights ({type(mod).__name__}) are not supported; lrc "
                                   "compresses Linear layers (to keep the experts dense and compress the rest, add "
                                   f"'{re.escape(sub)}' to stages[{si}].ignore)")
            for sub, mod in linear_units(block):
                if is_router(mod, experts):
                    continue
                name = f"{prefix}.{bi}.{sub}"
                if not wanted(name, targets, ignore):
                    continue
                if name in owner and not compensation and not recipe.same_group(owner[name], si):
                    raise LrcError(f"stages[{si}]: {name} is already compressed by stages[{owner[name]}]")
                owner.setdefault(name, si)
                hits += 1
                out.append((si, name, bi, mod))
        if hits == 0:
            raise LrcError(f"stages[{si}].targets: no Linear in the decoder blocks matches {stage.targets}")
    return out


def make_plan(model: nn.Module, recipe: Recipe) -> list[PlanRow]:
    from .methods import METHODS

    rows, seen = [], set()
    num_blocks = len(find_blocks(model)[1])
    methods: dict[int, object] = {}  # one configured method per stage that sets its rows' cost model
    for si, name, bi, mod in stage_targets(model, recipe):
        stage = recipe.stages[si]
        compensation = METHODS[stage.method].kind == "compensation"
        if not compensation and not isinstance(mod, nn.Linear):
            raise LrcError(f"stages[{si}]: {name} is already compressed ({type(mod).__name__}); only a "
                           "compensation stage (eora) can follow")
        if compensation and stage.allocator != "uniform" and name in seen:
            raise LrcError(f"stages[{si}]: allocator {stage.allocator} spreads residual ranks by the residual of "
                           f"{name}, which stages[{min(r.stage for r in rows if r.name == name)}] only creates "
                           "during compression; use the uniform allocator here, or compress first and run "
                           "`lrc compensate --allocator energy` on the result")
        bias = getattr(mod, "bias", None) is not None if isinstance(mod, nn.Linear) else False
        row = PlanRow(name, si, stage.method, bi, mod.out_features, mod.in_features, bias, None, None,
                      compensation=compensation, standalone=name not in seen or stage.group is not None,
                      base_params=None if isinstance(mod, nn.Linear) else
                      unit_params(mod), align=stage.align)
        method_cls = METHODS[stage.method]
        if not compensation and method_cls.cost_model != "lowrank":  # e.g. CoSpaDi: dictionary rows, k/s, sharing
            if si not in methods:
                methods[si] = method_cls(recipe.method_config(si))
            method = methods[si]
            row.cost_model = method_cls.cost_model
            row.cost_args = method.cost_args(row, bi, num_blocks, _value_bits(mod))
        row.alternative = stage.group is not None
        rows.append(row)
        seen.add(name)
    owner = {r.name: r.stage for r in rows if not r.compensation}
    for si, stage in enumerate(recipe.stages):
        check = getattr(METHODS[stage.method], "check_stage", None)
        if METHODS[stage.method].unit == "linear" and check is not None:
            why = check(METHODS[stage.method](recipe.method_config(si)), stage, si)
            if why:
                raise LrcError(why)
        if METHODS[stage.method].unit == "block":
            from .allocation.units import allocate_units
            from .plan_units import check_stage, unit_rows

            check_stage(stage, si, recipe)
            units, _notes = unit_rows(model, recipe, si, owner)
            if stage.allocator == "uniform":
                allocate_units(stage, units)
            else:
                for u in units:
                    u.note = f"{stage.allocator} allocator (needs the dense pre-pass)" + \
                        (f"; {u.remark}" if u.remark else "")
            rows.extend(units)
            continue
        allocate(stage, [r for r in rows if r.stage == si])
    check_order(rows, recipe)
    return rows


def row_modules(row) -> list[str]:
    """The module names a plan row acts on: a Linear's own name, a unit's members."""
    return row.modules()


def check_order(rows: list, recipe: Recipe) -> None:
    """Refuse, in one line and before any work, a stage that acts on a module an earlier stage leaves as a kind the
    later method cannot take (``Method.acts_on``, ``Method.leaves``): e.g. EoRA after MoDeGPT (the residual needs
    W and W_c of one shape) or after a dictionary shared across blocks (fitted only blocks later). A row that keeps
    its module as it is (``factorize`` False) leaves it dense; a knob decided from data (None) counts as compressed."""
    from .methods import METHODS
    from .methods.base import MODULE_KINDS

    left: dict[str, tuple[str, int]] = {}  # module name -> (kind, the stage that left it so)
    for si, stage in enumerate(recipe.stages):
        method = METHODS[stage.method](recipe.method_config(si))
        mine = [r for r in rows if r.stage == si]
        for r in mine:
            for name in row_modules(r):
                kind, by = left.get(name, ("dense", None))
                if kind not in method.acts_on and not recipe.same_group(by, si):  # alternatives: one will act
                    raise LrcError(f"stages[{si}]: {stage.method} cannot follow stages[{by}] "
                                   f"({recipe.stages[by].method}) on {name}: that leaves {MODULE_KINDS[kind]}, and "
                                   f"{stage.method} acts on {' or '.join(MODULE_KINDS[k] for k in sorted(method.acts_on))}"
                                   f" (target other modules with stages[{si}].targets/ignore, or drop a stage)")
        for r in mine:
            if r.factorize is not False:
                for name in row_modules(r):
                    left[name] = (method.leaves(), si)


def _value_bits(mod: nn.Module) -> int:
    """Bits per stored value: the width of the module's floating-point weights (the checkpoint's dtype)."""
    p = next((p for p in mod.parameters() if p.is_floating_point()), None)
    return 8 * p.element_size() if p is not None else 16


def totals(rows: list[PlanRow]) -> dict:
    """Parameter accounting over the targeted Linears (weights + biases; embeddings and lm_head excluded)."""
    before = sum(r.params_before for r in rows)
    known = [r for r in rows if r.params_after is not None]
    after = sum(r.params_after for r in known) if len(known) == len(rows) else None
    return {
        "targeted_modules": len({r.name for r in rows}),
        "factorized_modules": sum(1 for r in rows if r.factorize and not r.compensation),
        "dense_modules": sum(1 for r in rows if r.factorize is False),
        "compensated_modules": sum(1 for r in rows if r.compensation),
        "targeted_params_before": before,
        "targeted_params_after": after,
        "kept_fraction_of_targeted": (after / before) if after is not None and before else None,
    }
