"""What ``lrc finetune`` trains and how (issue 14). Defaults follow the recovery settings of the papers where they
give one: SVD-LLM updates its factors LoRA-style with AdamW (methods.md §3b); WeLore fine-tunes only the low-rank
components, the matrices it factorised (methods.md §4), which is ``train: lrc`` here."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(..., description="training text: a calib/ set name, a local .txt/.jsonl/.parquet file, or "
                                       "selfgen (sequences the teacher samples itself, chat-formatted for an instruct "
                                       "model: compress/selfgen.py)")
    loss: Literal["lm", "distill"] = Field(
        "lm", description="lm: causal-LM loss on the text; distill: KL(teacher ‖ model) per token, the teacher "
                          "(the dense model) held frozen beside the model")
    teacher: str | None = Field(None, description="dense model for loss distill and data selfgen (default: the model "
                                                  "the checkpoint was compressed from, as its report records it)")
    selfgen_samples: int = Field(64, gt=0, description="data selfgen: sequences sampled (held-out ones included)")
    selfgen_prompts: str | None = Field(None, description="data selfgen: the user turns (calibration.selfgen_prompts: "
                                                          "a bundled set or a local file; default: in a recipe whose calibration is "
                                                          "selfgen, its prompts, else instructions)")

    def recorded(self) -> dict:
        """The configuration as reports and state keys record it: ``selfgen_prompts`` absent when unset, as before
        it existed (the same reports and resumable states)."""
        data = self.model_dump()
        if data.get("selfgen_prompts") is None:
            data.pop("selfgen_prompts", None)
        return data

    @field_validator("selfgen_prompts")
    @classmethod
    def _prompts_exist(cls, v):
        if v is not None:
            from ..selfgen import load_prompts

            load_prompts(v, "finetune.selfgen_prompts")  # a bad set name or file fails at parse, naming it
        return v
    factors: Literal["joint", "sequential"] = Field(
        "joint", description="joint: every trained parameter every step; sequential: SVD-LLM's order (methods.md "
                             "§3b): the low-rank modules' output factors U for the first half of the steps, then "
                             "their input factors V (other trained parameters throughout)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16: forward under bf16 autocast (weights and optimizer stay fp32); auto: bf16 on "
                            "CUDA, fp32 elsewhere. A model held in bf16/fp16 (recipe model.dtype) runs its forward in "
                            "that dtype and trains fp32 master copies of the trained parameters (AdamW's state fp32 "
                            "too), written back into the model's dtype after every step")
    steps: int = Field(200, gt=0, description="optimizer steps")
    train: Literal["lrc", "residual", "all"] = Field(
        "lrc", description="lrc: only the modules lrc built, replaced or resized, as the checkpoint records them "
                           "(lrc.modules: factorised, dictionary, compensated, rebuilt attention and resized dense "
                           "Linears; WeLore's LRC-only); residual: only the EoRA residual paths; all: every "
                           "parameter (for comparison)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0)
    warmup: int = Field(10, ge=0, description="linear warm-up steps, then cosine decay to 0")
    batch_size: int = Field(4, gt=0, description="windows per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    seq_len: int = Field(256, gt=1, description="tokens per packed window")
    holdout: int | None = Field(None, ge=0, description="windows held out of training, their loss reported (default: "
                                                        "a tenth of the windows, at least 1 and at most 8; issue 22)")
    eval_every: int = Field(50, gt=0, description="steps between held-out evaluations")
    save_every: int = Field(50, gt=0, description="steps between resumable training states")
    checkpointing: bool = Field(False, description="gradient checkpointing (less memory, one more forward)")
    seed: int = Field(0, description="window order and held-out split")
    max_windows: int | None = Field(None, gt=0, description="use at most this many windows of the text")
