"""Recipes: pydantic models of the YAML a user writes, and loading with one-line errors.

A recipe has model defaults, a calibration set, engine options and an ordered list of stages. Each stage names a
registered method, its typed ``options``, the modules it targets, and exactly one budget:

- ``param_ratio``: fraction of each targeted matrix's parameters that is KEPT (0.8 keeps 80%, removes 20%);
- ``rank``: the same rank for every targeted matrix;
- ``energy``: keep the smallest rank whose (method-weighted) singular values hold this fraction of the energy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from .allocation import ALLOCATORS
from .errors import LrcError
from .eval.tasks import TASKS
from .finetune.config import FinetuneConfig
from .methods import METHODS

DEFAULT_TARGETS = None  # None = every nn.Linear inside the decoder blocks (never embeddings or lm_head)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


TextFormat = Literal["auto", "text", "arc"]
_FORMAT_HELP = ("how a record becomes text: text (its text_field), arc (\"Question: …\\nAnswer: <correct choice>\", "
                "ARC's own or the hub's layout), auto (text_field if present, else arc for ARC-shaped records)")


class CalibrationSource(_Strict):
    """One part of a mixed calibration set."""
    dataset: str = Field(description="name of a set in calib/ or a local .txt/.jsonl/.parquet")
    weight: float = Field(1.0, gt=0, description="share of the samples (weights are normalised)")
    text_field: str | None = None
    format: TextFormat = Field("auto", description=_FORMAT_HELP)


class CalibrationConfig(_Strict):
    """Calibration text → ``samples`` windows of ``seq_len`` tokens. ``mix`` replaces ``dataset`` with several
    sources sharing the windows by weight (e.g. EoRA's 50% general text + 50% task data)."""
    dataset: str = Field("wikitext2", description="name of a set in calib/, a local .txt/.jsonl/.parquet, or selfgen")
    samples: int = Field(32, gt=0)
    seq_len: int = Field(256, gt=1)
    seed: int = 0
    selfgen_chat: float | None = Field(None, ge=0, le=1, description=(
        "selfgen: share of the samples that are chat-formatted (a bundled user turn, the model's own reply, packed; "
        "needs a chat template); default: all when the tokenizer has a chat template, else none"))
    selfgen_prompts: str | None = Field(None, description=(
        "selfgen: the user turns of chat-formatted samples: a bundled set (instructions [default], questions: short "
        "questions with one-line answers, instructions+questions) or a local .txt (one a line) / .jsonl (prompt)"))
    text_field: str | None = Field(None, description="field holding the text in a local .jsonl/.parquet")
    format: TextFormat = Field("auto", description=_FORMAT_HELP)
    mix: list[CalibrationSource] | None = Field(None, min_length=1, description="several sources, by weight "
                                                                                "(replaces dataset)")

    @model_validator(mode="after")
    def _mix_fits(self):
        if self.mix and len(self.mix) > self.samples:
            raise ValueError(f"mix has {len(self.mix)} sources but only {self.samples} samples to share")
        if self.mix and any(m.dataset == "selfgen" for m in self.mix):
            raise ValueError("selfgen cannot be part of a mix")
        if self.selfgen_prompts is not None:
            from .selfgen import load_prompts

            load_prompts(self.selfgen_prompts)  # a bad set name or file fails at parse, naming it
        return self

    def sources(self) -> list[CalibrationSource]:
        if self.mix:
            return list(self.mix)
        return [CalibrationSource(dataset=self.dataset, text_field=self.text_field, format=self.format)]


class EngineConfig(_Strict):
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    batch_size: int = Field(8, gt=0, description="calibration samples per block forward")
    propagate: Literal["compressed", "original"] = Field(
        "compressed", description="next block's inputs come from the compressed (default) or the original block")
    sequential: bool = Field(
        True, description="within a block, compress q/k/v → o → gate/up → down so later groups see earlier ones")
    objective: Literal["layer", "dense"] = Field(
        "layer", description="layer: each Linear reproduces its own outputs on the inputs it now sees, "
                             "min ||(W−W')X̃||; dense: it reproduces the dense model's outputs, min ||WX − W'X̃|| "
                             "(corrects the drift of earlier compression; needs propagate: compressed)")
    dense_damping: float = Field(0.1, ge=0, description="dense objective: shrink the least-squares fit towards W by "
                                                        "damping·mean(diag X̃X̃ᵀ)·||W′−W||² (0 = plain fit)")

    @model_validator(mode="after")
    def _dense_needs_compressed(self):
        if self.objective == "dense" and self.propagate != "compressed":
            raise ValueError("objective: dense needs propagate: compressed (with original inputs there is no "
                             "drift to correct)")
        return self


class RefineConfig(_Strict):
    """Block refinement anchored to the dense block (AA-SVD, arXiv 2604.02119; methods.md §13): after a block's
    stages, train its parameters so that the compressed block on the compressed model's inputs reproduces the dense
    block's outputs on the dense model's inputs (MSE), then propagate from the refined block. Defaults are the
    paper's (25 passes over 8 mini-batches of 32 sequences = 200 steps); on a CPU scale ``steps`` and
    ``batch_size`` down. A section of its own, not a stage: it trains the whole block after every stage has run
    and has no budget, targets or method of its own."""
    steps: int = Field(200, ge=0, description="optimizer steps per block (AA-SVD: 200)")
    batch_size: int = Field(32, gt=0, description="calibration sequences per step (AA-SVD: 32)")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (AA-SVD: 1e-4)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (AA-SVD: 0.01)")
    warmup: float = Field(0.1, ge=0, lt=1, description="linear warm-up, as a fraction of the steps (AA-SVD: 0.1)")
    min_lr: float = Field(0.1, ge=0, le=1, description="cosine decay ends at this fraction of lr (AA-SVD: 0.1)")
    clip: float = Field(1.0, gt=0, description="gradient-norm clip (AA-SVD: 1.0)")
    train: Literal["all", "lrc"] = Field("all", description="all: every parameter of the block (AA-SVD); lrc: only "
                                                            "the modules lrc rebuilt")
    norms: bool = Field(True, description="train the block's norm weights too (AA-SVD: yes)")
    seed: int = Field(0, description="seeds each block's mini-batch order (a resumed run refines identically)")


def _group_size(v: int | None) -> int | None:
    if v is not None and v < 1:
        raise ValueError(f"must be >= 1 or null (one group per row), got {v}")
    return v


GroupSize = Annotated[int | None, AfterValidator(_group_size)]


class EmbeddingQuantConfig(_Strict):
    """``quantize.embeddings``: the token embeddings stored as ``bits``-bit codes, round to nearest (RTN) per group of
    ``group_size`` consecutive entries of each row (None: one scale per row), and the output head with them: a head
    tied to the embeddings uses the quantized table (stored once), an untied head becomes a ``QuantLinear`` of the
    same settings. Scales are stored as the section's ``scale_dtype``. The default (int8, one symmetric scale per row)
    is the layout of PyTorch's int8 weight-only kernel, which the head then runs."""
    bits: Literal[8, 4, 3, 2] = Field(8, description="bits per code")
    group_size: GroupSize = Field(None, description="entries of a row per scale (None: one per row; int4: 32-128)")
    symmetric: bool = Field(True, description="no zero points (codes centred at 2^(bits-1))")

    def spec(self, scale_dtype: str):
        """The ``QuantSpec`` of the table (scales stored as the ``quantize`` section's ``scale_dtype``)."""
        from .quant.math import QuantSpec

        return QuantSpec(self.bits, self.group_size, self.symmetric, scale_dtype)


class CompensateConfig(_Strict):
    """``quantize.compensate``: after a block's Linears are quantized, a registered compensation method (EoRA, Liu
    et al., arXiv 2410.21271; methods.md §7) adds to each a residual path of ``rank`` repairing its quantization
    error ``W − Q(W)`` on the same inputs (the Gram GPTQ used), stored in the model's dtype (or quantized itself,
    ``bits``: EoRA's README quantizes the adapter too) and counted in the checkpoint's bytes (and, under a byte
    budget, in every option quantized below 16 bits). EoRA's paper: rank 16–128 on GPTQ 3/4-bit weights."""
    method: str = Field("eora", description="a registered method of kind compensation")
    rank: int = Field(..., ge=1, description="residual rank per quantized Linear (at most min(out, in))")
    bits: Literal[16, 8, 4, 3, 2] = Field(16, description="the residual's two factors stored at this width (the "
                                                          "section's group size, symmetry and method; 16: the "
                                                          "model's dtype)")

    @field_validator("method")
    @classmethod
    def _a_compensation_method(cls, v):
        able = sorted(n for n, m in METHODS.items() if m.kind == "compensation")
        if v not in able:
            raise ValueError(f"{v!r} is not a compensation method (one of {', '.join(able)})")
        return v


class QuantizeConfig(_Strict):
    """Quantized storage of the Linears a block holds after its stages (factors, resized and dense ones alike;
    ``compress/quant``, methods.md §15): per group of ``group_size`` input columns a scale (and a zero point unless
    symmetric), codes of ``bits`` bits packed into bytes. ``method``: ``rtn`` (round to nearest) or ``gptq`` (Frantar
    et al. 2023, Alg. 1: error feedback with the Gram each matrix sees on the compressed model's calibration inputs
    — a factor's second half sees the first half's outputs). Runs per block after its stages (and ``refine``); the
    next block sees the quantized one."""
    bits: Literal[8, 4, 3, 2] = Field(4, description="bits per code")
    group_size: GroupSize = Field(128, description="input columns per scale (None: one per row; GPTQ/torchao: 128)")
    symmetric: bool = Field(False, description="no zero points (codes centred at 2^(bits-1)); int8 with group_size "
                                               "None and symmetric runs PyTorch's int8 weight-only kernel")
    method: Literal["rtn", "gptq"] = Field("gptq", description="rtn or gptq (error feedback on the input Gram)")
    damp: float = Field(0.01, ge=0, description="GPTQ: damping, a fraction of mean(diag H) (GPTQ: 0.01)")
    act_order: bool = Field(False, description="GPTQ: columns by descending diag H (groups stay static)")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    targets: list[str] | None = Field(None, description="regexes on the Linears' full names (a factor's: "
                                                        "'<module>.first' / '.second'); None: every Linear in the "
                                                        "decoder blocks")
    ignore: list[str] = Field(default_factory=list)
    embeddings: EmbeddingQuantConfig | None = Field(
        None, description="the token embeddings (and the output head, tied or not) quantized too, RTN, before the "
                          "first block (the calibration streams see them); None: left as they are")
    compensate: CompensateConfig | None = Field(
        None, description="a low-rank residual on each quantized Linear repairing its quantization error (EoRA)")
    bits_options: list[Literal[16, 8, 4, 3, 2]] | None = Field(
        None, description="widths a byte-budget search may give each module of its stage (16: not quantized); the "
                          "stage gives byte_ratio instead of param_ratio; other modules get bits")

    @field_validator("bits_options")
    @classmethod
    def _some_narrow_width(cls, v):
        if v is not None and not any(b < 16 for b in v):
            raise ValueError(f"give at least one width below 16 to trade against rank, got {v}")
        return v

    def spec(self, bits: int | None = None):
        """The ``QuantSpec`` of the section at ``bits`` (default ``bits``)."""
        from .quant.math import QuantSpec

        return QuantSpec(bits or self.bits, self.group_size, self.symmetric, self.scale_dtype)


BUDGETS = ("param_ratio", "rank", "energy", "byte_ratio")


class StageConfig(_Strict):
    method: str
    param_ratio: float | None = Field(None, description="fraction of targeted parameters KEPT, in (0, 1]")
    rank: int | None = Field(None, ge=1)
    energy: float | None = None
    byte_ratio: float | None = Field(None, description="fraction of the targeted modules' bytes KEPT, dense bytes "
                                                       "counted at 16 bits a value; the search allocator chooses "
                                                       "each module's knob and bit width (quantize.bits_options)")
    allocator: str = Field(
        "uniform", description="a registered allocator (lrc methods): uniform: same ratio per matrix; energy / welore "
                               "/ loss / sensitivity: one global budget over the stage's matrices from their spectra "
                               "(see compress/allocation)")
    allocator_options: dict[str, Any] = Field(default_factory=dict, description="the allocator's options (welore: "
                                              "target; loss: mode, normalize; sensitivity: ratios, samples)")
    targets: list[str] | None = Field(DEFAULT_TARGETS, description="regexes on module names (re.search)")
    ignore: list[str] = Field(default_factory=list)
    align: int = Field(1, ge=1, description="round ranks down to a multiple of this")
    options: dict[str, Any] = Field(default_factory=dict)
    calibration: CalibrationConfig | None = Field(
        None, description="this stage's own statistics set (e.g. task questions for EoRA), propagated through the "
                          "compressed blocks beside the recipe's calibration; default: the recipe's")
    group: str | None = Field(None, description="stages with the same group offer their methods for the same "
                                                "modules: the search allocator picks, per module, one method and "
                                                "its knob (or dense) under the group's one param_ratio budget; "
                                                "written for you by a stage's `methods: [...]`")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; registered: {', '.join(sorted(METHODS))}")
        return v

    @field_validator("allocator")
    @classmethod
    def _known_allocator(cls, v: str) -> str:

        if v not in ALLOCATORS:
            raise ValueError(f"unknown allocator {v!r}; registered: {', '.join(sorted(ALLOCATORS))}")
        return v

    @field_validator("allocator_options")
    @classmethod
    def _allocator_options(cls, v: dict, info):

        if info.data.get("allocator") in ALLOCATORS:  # an unknown allocator is reported on its own field
            ALLOCATORS[info.data["allocator"]].check_options(v)
        return v

    @field_validator("param_ratio", "energy", "byte_ratio")
    @classmethod
    def _fraction(cls, v, info):
        what = {"param_ratio": "parameters", "energy": "spectral energy", "byte_ratio": "bytes"}[info.field_name]
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1] (fraction of {what} kept); got {v}")
        return v

    @model_validator(mode="after")
    def _one_budget(self):
        given = [k for k in BUDGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one budget of {', '.join(BUDGETS)}; got {given or 'none'}")
        return self

    @model_validator(mode="after")
    def _rank_aligned(self):
        if self.rank is not None and self.rank % self.align:
            raise ValueError(f"rank {self.rank} is not a multiple of align {self.align}")
        return self

    @model_validator(mode="after")
    def _compensation_budget(self):

        if METHODS[self.method].kind == "compensation" and (
                self.energy is not None or not ALLOCATORS[self.allocator].allocates("residual")):
            able = [n for n, a in ALLOCATORS.items() if a.allocates("residual")]
            able = " or ".join(filter(None, (", ".join(able[:-1]), able[-1])))
            raise ValueError(f"{self.method} adds a residual: give its rank or param_ratio (extra parameters as a "
                             f"fraction of each matrix) with the {able} allocator")
        return self

    @model_validator(mode="after")
    def _allocator_fits_method(self):

        method = METHODS[self.method]
        if method.kind != "compensation" and not any(ALLOCATORS[self.allocator].allocates(k)
                                                     for k in method.unit_kinds_all):
            able = [n for n, a in ALLOCATORS.items() if any(a.allocates(k) for k in method.unit_kinds_all)]
            raise ValueError(f"allocator {self.allocator} cannot allocate {self.method}'s units; use "
                             + " or ".join(able))
        return self

    @model_validator(mode="after")
    def _global_needs_ratio(self):

        if self.byte_ratio is not None and ALLOCATORS[self.allocator].reads != "anchors":
            raise ValueError(f"byte_ratio: a byte budget trades rank against bit width by predicted error; use "
                             f"allocator search (got {self.allocator})")
        if ALLOCATORS[self.allocator].is_global and self.param_ratio is None and self.byte_ratio is None:
            raise ValueError(f"allocator {self.allocator} distributes a param_ratio budget; give param_ratio")
        return self

    @property
    def budget(self) -> tuple[str, float]:
        for k in BUDGETS:
            if getattr(self, k) is not None:
                return k, getattr(self, k)
        raise AssertionError


class EvalConfig(_Strict):
    """What ``lrc eval`` measures; as a recipe's ``eval`` section, ``lrc compress`` runs it on the result."""
    ppl: list[str] = Field(default_factory=list, description="perplexity sets: calib/ names with an eval split "
                                                             "(wikitext2, ptb, c4) or local .txt/.jsonl files")
    seq_len: int = Field(2048, gt=1, description="perplexity window (capped by the model's context)")
    stride: int | None = Field(None, gt=0, description="sliding windows with this stride (default non-overlapping)")
    max_windows: int | None = Field(None, gt=0, description="score only the first N windows")
    bos: bool = Field(False, description="prepend BOS to every window")
    kl: bool = Field(False, description="in a recipe: KL(dense‖compressed) and top-1 agreement to the input model")
    chat: bool = Field(False, description="answer 20 fixed chat prompts (instruct models): the fraction of non-empty "
                                          "replies, and with a reference the KL over its replies")
    tasks: list[str] = Field(default_factory=list, description="lm-eval zero-shot tasks shipped with lrc")
    limit: int | None = Field(None, gt=0, description="zero-shot: first N documents per task")
    data_dir: str | None = Field(None, description="zero-shot data directory (default $LRC_DATA_DIR)")
    batch_size: int = Field(4, gt=0, description="windows (perplexity) or requests (zero-shot) per forward")
    request_cache: bool = Field(True, description="reuse zero-shot answers and chat replies cached for these exact "
                                                   "weights")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:

        unknown = [t for t in v if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; lrc ships {', '.join(TASKS)}")
        return v


class Recipe(_Strict):
    name: str | None = None
    description: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    stages: list[StageConfig] = Field(default_factory=list, description="at least one, unless quantize is given "
                                                                         "(quantization alone: the baselines)")
    finetune: FinetuneConfig | None = Field(None, description="recovery training after the stages, before eval "
                                                              "(the options of lrc finetune; compress/finetune)")
    refine: RefineConfig | None = Field(None, description="block refinement after each block's stages (AA-SVD; "
                                                          "needs propagate: compressed)")
    quantize: QuantizeConfig | None = Field(None, description="quantized storage of every Linear a block holds "
                                                              "after its stages (and refine): int8/4/3/2, RTN or "
                                                              "GPTQ (compress/quant)")
    eval: EvalConfig | None = Field(None, description="evaluate the compressed model before it is written")
    samples: int = Field(3, ge=0, le=4, description="fixed prompts answered greedily by the compressed and "
                                                              "the dense model, shown in the summary, report and card; "
                                                              "0: none (it loads both models whole)")

    @model_validator(mode="before")
    @classmethod
    def _expand_methods(cls, data):
        """``methods: [a, b, ...]`` on a stage → one stage per method, all in one ``group`` (``expand_methods``)."""
        if isinstance(data, dict) and isinstance(data.get("stages"), list):
            data = {**data, "stages": expand_methods(data["stages"])}
        return data

    @model_validator(mode="after")
    def _quantize_last(self):
        if self.quantize is not None and self.finetune is not None:
            raise ValueError("finetune: quantized weights are not trained; fine-tune first, then quantize the "
                             "fine-tuned checkpoint with a recipe that has only a quantize section")
        return self

    @model_validator(mode="after")
    def _finetune_prompts(self):
        """``finetune.selfgen_prompts`` unset, with ``data: selfgen`` after a ``selfgen`` calibration: the
        calibration's user turns, so the distillation samples the kind of text the model was calibrated on."""
        ft, cal = self.finetune, self.calibration
        if ft is not None and ft.data == "selfgen" and ft.selfgen_prompts is None and cal.dataset == "selfgen":
            ft.selfgen_prompts = cal.selfgen_prompts
        return self

    @model_validator(mode="after")
    def _byte_budget(self):
        byte = [i for i, st in enumerate(self.stages) if st.byte_ratio is not None]
        options = self.quantize.bits_options if self.quantize is not None else None
        if byte and not options:
            raise ValueError(f"stages[{byte[0]}].byte_ratio: a byte budget needs a quantize section with "
                             "bits_options (the widths to choose from, e.g. [4, 8, 16])")
        if options and not byte:
            raise ValueError("quantize.bits_options: chosen per module by a search stage with byte_ratio; give one "
                             "(or use bits alone)")
        if len(byte) > 1 and len({self.stages[i].group or i for i in byte}) > 1:
            raise ValueError(f"stages[{byte[1]}].byte_ratio: one byte budget per recipe (one search stage or group)")
        block = [i for i in byte if METHODS[self.stages[i].method].unit == "block"]
        if block and self.quantize.compensate is not None:
            raise ValueError(f"quantize.compensate: a byte budget prices the residuals of Linear rows only, and "
                             f"stages[{block[0]}] offers {self.stages[block[0]].method} units (drop one of the two)")
        return self

    @model_validator(mode="after")
    def _something_to_do(self):
        if not self.stages and self.quantize is None:
            raise ValueError("stages: give at least one stage (or a quantize section for quantization alone)")
        return self

    @model_validator(mode="after")
    def _groups(self):
        for name in dict.fromkeys(st.group for st in self.stages if st.group is not None):
            idx = [i for i, st in enumerate(self.stages) if st.group == name]
            first = self.stages[idx[0]]
            for i in idx:
                st = self.stages[i]
                if ALLOCATORS[st.allocator].reads != "anchors":
                    raise ValueError(f"stages[{i}].group: alternatives are chosen by the search allocator; "
                                     f"got allocator {st.allocator}")
                if METHODS[st.method].kind == "compensation":
                    raise ValueError(f"stages[{i}].group: {st.method} adds a residual and is no alternative")
                for key in ("param_ratio", "byte_ratio", "allocator_options", "align"):
                    if getattr(st, key) != getattr(first, key):
                        raise ValueError(f"stages[{i}].{key}: every stage of group {name!r} shares one budget "
                                         f"and search: {getattr(st, key)} differs from stages[{idx[0]}]'s "
                                         f"{getattr(first, key)}")
            if idx != list(range(idx[0], idx[-1] + 1)):
                raise ValueError(f"stages[{idx[-1]}].group: the stages of group {name!r} must be consecutive")
            if len({self.stages[i].method for i in idx}) < len(idx):
                raise ValueError(f"stages[{idx[-1]}].group: group {name!r} offers a method twice")
        return self

    def same_group(self, i: int | None, j: int) -> bool:
        """Whether stages ``i`` and ``j`` are alternatives for the same modules (one group)."""
        return i is not None and self.stages[j].group is not None and self.stages[i].group == self.stages[j].group

    def siblings(self, i: int) -> list[int]:
        """The stages offering alternatives with stage ``i`` (its group, itself included; ``[i]`` without one)."""
        g = self.stages[i].group
        return [i] if g is None else [j for j, st in enumerate(self.stages) if st.group == g]

    @model_validator(mode="after")
    def _stage_calibration(self):

        for i, st in enumerate(self.stages):
            if st.calibration is None:
                continue
            if ALLOCATORS[st.allocator].is_global:
                raise ValueError(f"stages[{i}].calibration: global allocators read the recipe's calibration; use "
                                 "allocator uniform or move this set to calibration")
            if self.engine.objective == "dense":
                raise ValueError(f"stages[{i}].calibration: engine.objective dense pairs the recipe's calibration "
                                 "with the dense model's; a stage set needs objective layer")
        return self

    @model_validator(mode="after")
    def _refine_needs_compressed(self):
        if self.refine is not None and self.engine.propagate != "compressed":
            raise ValueError("refine: needs engine.propagate: compressed (it fits each block to the inputs the "
                             "compressed model gives it)")
        if self.refine is not None and any(st.calibration is not None for st in self.stages):
            raise ValueError("refine: pairs the recipe's calibration with the dense model's; stages with their own "
                             "calibration need no refine section")
        return self

    def stage_calibration(self, i: int) -> CalibrationConfig:
        return self.stages[i].calibration or self.calibration

    def method_config(self, i: int):
        stage = self.stages[i]
        return METHODS[stage.method].config_cls.model_validate(stage.options)

    def resolved(self) -> dict:
        """The recipe with every default filled in, method options included (saved next to the weights)."""
        data = self.model_dump(mode="json")
        for section in ("refine", "quantize"):  # absent, as before the sections existed (same caches, reports)
            if data.get(section) is None:
                data.pop(section, None)
        for i, stage in enumerate(data["stages"]):
            stage["options"] = self.method_config(i).model_dump(mode="json")
            for key in ("group", "byte_ratio"):  # absent when unused, as before they existed (same caches)
                if stage.get(key) is None:
                    stage.pop(key, None)
        for key in ("bits_options", "embeddings", "compensate"):  # absent when unused, as before they existed (same caches)
            if data.get("quantize") is not None and data["quantize"].get(key) is None:
                data["quantize"].pop(key)
        for section in [data.get("calibration"), data.get("finetune"), *(st.get("calibration") for st in data["stages"])]:
            if isinstance(section, dict) and section.get("selfgen_prompts", 0) is None:  # likewise
                section.pop("selfgen_prompts")
        return data


def expand_methods(stages: list) -> list:
    """A stage ``{methods: [a, b], ...}`` becomes ``[{method: a, group: "stages[i]", ...}, {method: b, ...}]``
    (``options``, if given, maps each method to its own options); other stages pass unchanged."""
    out = []
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or "methods" not in st:
            out.append(st)
            continue
        methods = st["methods"]
        if not isinstance(methods, list) or len(methods) < 1 or not all(isinstance(m, str) for m in methods):
            raise ValueError(f"stages[{i}].methods: a list of method names")
        if "method" in st:
            raise ValueError(f"stages[{i}]: give method or methods, not both")
        options = st.get("options") or {}
        if not isinstance(options, dict) or set(options) - set(methods):
            raise ValueError(f"stages[{i}].options: with methods, a mapping from each method to its options "
                             f"(methods: {methods})")
        rest = {k: v for k, v in st.items() if k not in ("methods", "options")}
        group = rest.pop("group", None) or f"stages[{i}]"
        for m in methods:
            out.append({**rest, "method": m, "group": group, "options": options.get(m) or {}})
    return out


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _one_line(err: ValidationError, source: str, prefix: tuple = ()) -> LrcError:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal"))))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    where = _loc(prefix + loc)
    return LrcError(f"{source}: {where}: {msg}" if where else f"{source}: {msg}")


def parse_model(cls, source: str, **values):
    """Validate ``values`` as ``cls`` (a config model); one-line ``LrcError`` naming the field on failure."""
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        raise _one_line(err, source) from None


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; raise ``LrcError`` with one line naming ``source`` and the field path."""
    if not isinstance(data, dict):
        raise LrcError(f"{source}: a recipe must be a YAML mapping with at least 'stages'")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise _one_line(err, source) from None
    for i in range(len(recipe.stages)):
        try:
            recipe.method_config(i)
        except ValidationError as err:
            raise _one_line(err, source, ("stages", i, "options")) from None
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise LrcError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise LrcError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    return parse_recipe(data, str(path))
