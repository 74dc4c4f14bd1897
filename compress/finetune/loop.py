"""The training loop of ``lrc finetune``: causal-LM loss on packed windows, AdamW over the trained parameters only,
linear warm-up then cosine decay, gradient accumulation, held-out loss every ``eval_every`` steps, and a resumable
state every ``save_every`` steps (trained parameters, optimizer, schedule, step; written to a temporary file and
renamed, so a crash leaves the previous state whole). The window order is a function of the step number
(``data.batch_at``), so a resumed run trains on exactly the batches the interrupted one would have.

``loss: distill`` replaces the LM loss with the mean over tokens of KL(teacher ‖ model) of the next-token
distributions (temperature 1, the forward KL of knowledge distillation), the teacher's logits computed per micro-batch
without gradients. ``factors: sequential`` trains the low-rank modules' U factors (``second``) for the first half of
the steps and their V factors (``first``) for the second, SVD-LLM's order (methods.md §3b): the parameters outside
the phase hold ``requires_grad=False``, so AdamW (which skips parameters without a gradient) leaves them and their
moments untouched, and one optimizer serves both phases and a resume.

Trained parameters held in bf16 or fp16 (a recipe's ``model.dtype``) get fp32 master copies (``Masters``, issue 22):
the model computes in its own dtype, each micro-batch's gradients are added up in fp32 on the masters, AdamW updates
the masters (its moments fp32 too) and the model's parameters are rounded from them after every step, so updates
smaller than a bf16 step accumulate instead of rounding away; the resumable state holds the masters. fp32 parameters
are their own masters: the fp32 path is unchanged, bit for bit."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from .config import FinetuneConfig
from .data import batch_at
from .params import factor_phases, freeze_all_but

STATE_FILE = "finetune_state.pt"


def schedule(cfg: FinetuneConfig):
    """Learning-rate factor per step: linear warm-up to 1 over ``warmup`` steps, then cosine to 0 at ``steps``."""
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        span = max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / span)))
    return factor


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch_size: int, device) -> float | None:
    """Token-weighted mean causal-LM loss over ``windows`` (None without any)."""
    if windows.numel() == 0:
        return None
    was = model.training
    model.eval()
    total, tokens = 0.0, 0
    for s in range(0, windows.shape[0], batch_size):
        x = windows[s:s + batch_size].to(device)
        n = x.shape[0] * (x.shape[1] - 1)
        total += float(model(input_ids=x, labels=x, use_cache=False).loss) * n
        tokens += n
    model.train(was)
    return total / tokens


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ model) between the next-token distributions (rows of the last axis)."""
    from ..eval.kl import kl_rows

    return kl_rows(teacher_logits, logits).mean()


def autocast(cfg: FinetuneConfig, device):
    """bf16 autocast for ``precision: bf16`` (``auto``: on CUDA); a no-op context otherwise."""
    dev = torch.device(device)
    on = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on)


def _step_loss(model, x: torch.Tensor, teacher, cfg: FinetuneConfig, device) -> torch.Tensor:
    with autocast(cfg, device):
        if teacher is None:
            return model(input_ids=x, labels=x, use_cache=False).loss
        with torch.no_grad():
            t = teacher(input_ids=x, use_cache=False).logits
        return distill_loss(model(input_ids=x, use_cache=False).logits, t)


class Masters:
    """fp32 master weights of ``trained`` (name -> parameter): ``params`` holds, per name, the parameter itself when
    it is fp32 and a new fp32 leaf copy otherwise; the optimizer updates ``params``. ``fold_grads()`` after each
    backward moves the low-precision gradients onto the masters (summed in fp32); ``push()`` after each optimizer step
    rounds the masters into the model's parameters."""

    def __init__(self, trained: dict):
        self.params, self.pairs = {}, []
        for name, p in trained.items():
            if p.is_floating_point() and p.dtype != torch.float32:
                master = torch.nn.Parameter(p.detach().float(), requires_grad=True)
                self.pairs.append((p, master))
                self.params[name] = master
            else:
                self.params[name] = p

    def fold_grads(self) -> None:
        for p, master in self.pairs:
            if p.grad is not None:
                g = p.grad.float()
                master.grad = g if master.grad is None else master.grad.add_(g)
                p.grad = None

    @torch.no_grad()
    def push(self) -> None:
        for p, master in self.pairs:
            p.copy_(master)


def _save_state(path: Path, trained: dict, optimizer, scheduler, step: int, curve: list) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"step": step, "params": {n: p.detach().cpu() for n, p in trained.items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "curve": curve}, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, trained: dict, optimizer, scheduler) -> tuple[int, list]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if set(state["params"]) != set(trained):
        from ..errors import LrcError

        raise LrcError(f"{path}: the saved training state is for other parameters; remove it to start over")
    with torch.no_grad():
        for n, p in trained.items():
            p.copy_(state["params"][n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), list(state["curve"])


def train(model, trained: dict, train_windows: torch.Tensor, held_out: torch.Tensor, cfg: FinetuneConfig,
          device, state_dir: Path, resume: bool = False, log=None, stop_at: int | None = None, teacher=None) -> dict:
    """Train ``trained`` (name -> parameter of ``model``) in place; return the training record for the report.
    ``log(step, loss, held_out, tokens_per_s)`` is called after every step; ``stop_at`` ends the run after that
    step without finishing it (tests inject a crash with it)."""
    from ..progress import active

    phases = factor_phases(model, trained) if cfg.factors == "sequential" else None
    freeze_all_but(model, trained)
    model.to(device)  # the masters are made where the parameters are
    masters = Masters(trained)
    params = list(masters.params.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg))
    state_path = Path(state_dir) / STATE_FILE
    step, curve = (_load_state(state_path, masters.params, optimizer, scheduler) if resume and state_path.is_file()
                   else (0, []))
    masters.push()  # a resumed state's masters into the model
    if cfg.checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    first = step
    while step < cfg.steps:
        if phases is not None:
            freeze_all_but(model, phases[0] if step < cfg.steps // 2 else phases[1])
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for a in range(cfg.grad_accum):
            x = batch_at(train_windows, step * cfg.grad_accum + a, cfg.batch_size, cfg.seed).to(device)
            loss = _step_loss(model, x, teacher, cfg, device) / cfg.grad_accum
            loss.backward()
            masters.fold_grads()
            loss_sum += float(loss.detach())
        optimizer.step()
        masters.push()
        scheduler.step()
        step += 1
        held = held_out_loss(model, held_out, cfg.batch_size, device) if (
            step % cfg.eval_every == 0 or step == cfg.steps) else None
        curve.append({"step": step, "loss": loss_sum, "lr": scheduler.get_last_lr()[0],
                      **({"held_out_loss": held} if held is not None else {})})
        tps = tokens_per_step / (time.perf_counter() - t0)
        active().phase(f"finetune step {step}/{cfg.steps}: loss {loss_sum:.4f}, {tps:.0f} tokens/s")
        if log is not None:
            log(step, loss_sum, held, tps)
        if step % cfg.save_every == 0 and step < cfg.steps:
            _save_state(state_path, masters.params, optimizer, scheduler, step, curve)
        if stop_at is not None and step >= stop_at:
            return {"interrupted_at": step}
    model.eval()
    return {"loss": cfg.loss, "steps": cfg.steps, "resumed_from": first or None, "tokens": cfg.steps * tokens_per_step,
            "curve": curve}
