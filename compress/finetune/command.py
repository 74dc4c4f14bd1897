"""``lrc finetune``: the command (registered in ``compress/cli.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import LrcError


def finetune(
    model: str = typer.Argument(..., help="an lrc checkpoint (with --train all: any model)"),
    data: str = typer.Option(..., help="training text: a calib/ set, a local .txt/.jsonl/.parquet file, or selfgen "
                                       "(sampled by the teacher; chat-formatted for an instruct model)"),
    out_dir: Path = typer.Option(..., "--out", help="output checkpoint directory"),
    steps: int = typer.Option(200, help="optimizer steps"),
    train: str = typer.Option("lrc", help="lrc: only the modules lrc built or resized (WeLore); residual: only EoRA "
                                           "paths; all"),
    loss: str = typer.Option("lm", help="lm: causal-LM loss; distill: KL to the teacher's next-token distributions"),
    teacher: Optional[str] = typer.Option(None, help="dense model for --loss distill / --data selfgen (default: the "
                                                     "model the checkpoint was compressed from)"),
    selfgen_samples: int = typer.Option(64, help="--data selfgen: sequences to sample (held-out ones included)"),
    selfgen_prompts: Optional[str] = typer.Option(None, help="--data selfgen: the user turns: instructions "
                                                             "(default), questions, instructions+questions, or a "
                                                             ".txt/.jsonl of your own"),
    factors: str = typer.Option("joint", help="joint; sequential: U factors for half the steps, then V (SVD-LLM)"),
    precision: str = typer.Option("auto", help="auto (bf16 autocast on CUDA), fp32, bf16"),
    lr: float = typer.Option(1e-4, help="peak learning rate (AdamW; warm-up, then cosine decay)"),
    warmup: int = typer.Option(10, help="warm-up steps"),
    batch_size: int = typer.Option(4, help="windows per micro-batch"),
    grad_accum: int = typer.Option(1, help="micro-batches per step"),
    seq_len: int = typer.Option(256, help="tokens per packed window"),
    holdout: Optional[int] = typer.Option(None, help="windows held out of training; their loss is reported "
                                                     "(default: a tenth of the windows, 1 to 8)"),
    eval_every: int = typer.Option(50, help="steps between held-out evaluations"),
    save_every: int = typer.Option(50, help="steps between resumable states"),
    checkpointing: bool = typer.Option(False, help="gradient checkpointing"),
    seed: int = typer.Option(0, help="window order and held-out split"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N"),
    resume: bool = typer.Option(False, help="continue an interrupted run of the same command"),
    overwrite: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Recovery training of a compressed model on packed windows of local or self-generated text: causal-LM loss, or
    distillation from the dense model (--loss distill); only the chosen parameters trained (the rest frozen, without
    gradients or optimizer state). Writes a checkpoint of the same structure; its report records the training and
    the held-out loss before and after."""
    from ..console import fail as _fail
    from ..console import out
    from ..progress import Progress
    from ..recipe import parse_model
    from . import FinetuneConfig
    from .run import finetune as run

    def log(step, loss, held, tps):
        if step == 1 or step % eval_every == 0 or step == steps:
            extra = f", held-out loss {held:.4f}" if held is not None else ""
            bar.console.print(f"step {step}/{steps}: loss {loss:.4f}{extra}, {tps:.0f} tokens/s", highlight=False)

    try:
        cfg = parse_model(FinetuneConfig, "lrc finetune", data=data, steps=steps, train=train, loss=loss,
                          teacher=teacher, selfgen_samples=selfgen_samples, selfgen_prompts=selfgen_prompts,
                          factors=factors, precision=precision,
                          lr=lr, warmup=warmup,
                          batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, holdout=holdout,
                          eval_every=eval_every, save_every=save_every, checkpointing=checkpointing, seed=seed)
        bar = Progress()
        try:
            report = run(model, cfg, out_dir, resume=resume, overwrite=overwrite, device=device, log=log)
        finally:
            bar.close()
    except LrcError as e:
        _fail(e)
    ft = report["finetune"]
    if ft["held_out_loss_before"] is not None:
        out.print(f"held-out loss {ft['held_out_loss_before']:.4f} -> {ft['held_out_loss_after']:.4f}")
    out.print(f"{ft['trained_params']:,} of {ft['total_params']:,} parameters trained, {ft['seconds']:.0f} s")
    out.print(f"wrote {out_dir}")
