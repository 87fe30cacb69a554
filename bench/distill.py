"""Knowledge distillation of a compressed student from the uncompressed teacher on the calibration windows:
the training loop every distillation-based method shares (BinaryMoS, OneBit, ...). Steps, batch, lr and
warm-up come from `budget=`; the window order is a seeded permutation, reshuffled each epoch."""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bench.errors import NumericalFailure
from bench.precision import fp32


def frozen_student(teacher: nn.Module, make_layer: Callable[[nn.Module], nn.Module]):
    """The student every distillation-based method trains: a copy of `teacher` with all its parameters frozen
    and each block linear replaced by `make_layer(linear)`. Returns the student, its adapter and the new layers
    by name in the adapter's order; only parameters the new layers create themselves require grad."""
    from bench.models import adapter_for

    student = copy.deepcopy(teacher)
    adapter = adapter_for(student)
    for p in student.parameters():
        p.requires_grad_(False)
    layers = {}
    for ref in list(adapter.linears()):
        layers[ref.name] = make_layer(ref.module)
        adapter.replace_linear(ref, layers[ref.name])
    return student, adapter, layers


def kd_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) over the vocabulary, reduction "batchmean" (the references' KD term); at a
    temperature T both distributions are softened and the loss scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.softmax(teacher_logits.float() / t, -1),
                    reduction="batchmean") * (t * t)


def adamw_cosine(params, budget, steps: int):
    """AdamW (lr and weight decay from `budget=`) with linear warm-up over `budget.warmup_ratio` of the steps,
    then cosine decay to 0 (HF's "cosine" schedule): the optimizer every distillation loop here uses."""
    opt = torch.optim.AdamW(params, lr=budget.lr, betas=(0.9, 0.999), weight_decay=budget.weight_decay)
    warm = max(1, int(math.ceil(budget.warmup_ratio * steps)))

    def lr_at(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def train_record(losses: list[float], t0: float) -> dict:
    """What a training loop records: steps, wall seconds since `t0`, the loss averaged over the first and the last
    k steps (k = a quarter of the steps, 1..5) and every step's loss."""
    k = max(1, min(5, len(losses) // 4))
    return {"train_steps": len(losses), "train_seconds": time.perf_counter() - t0,
            "train_loss_first": sum(losses[:k]) / k, "train_loss_last": sum(losses[-k:]) / k,
            "train_losses": losses}


def distill(teacher, student, params, windows: torch.Tensor, budget, seed: int,
            loss_fn: Callable[[object, object], tuple[torch.Tensor, dict[str, float]]], desc: str,
            after_step: Callable[[], None] | None = None, attentions: bool = False,
            student_labels: bool = False) -> dict:
    """AdamW (weight decay from `budget=`, default 0) with linear warm-up then cosine decay to 0;
    `loss_fn(teacher_out, student_out)` returns the loss and named parts for the progress bar; `after_step`
    (e.g. a projection onto constraints) runs after each update. `attentions`: both outputs carry the
    attention maps (the caller makes attention eager); `student_labels`: the student's output carries its LM
    loss on the window. Returns the record."""
    steps = budget.steps()
    g = torch.Generator().manual_seed(seed)
    opt, sched = adamw_cosine(params, budget, steps)
    teacher.eval()
    student.train()
    losses = []
    order = torch.randperm(windows.shape[0], generator=g)
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        idx = [order[(step * budget.batch_size + j) % len(order)].item() for j in range(budget.batch_size)]
        if (step * budget.batch_size) // len(order) != ((step + 1) * budget.batch_size - 1) // len(order):
            order = torch.randperm(windows.shape[0], generator=g)
        ids = windows[idx]
        kwargs = {"output_hidden_states": True, "use_cache": False, "output_attentions": attentions}
        with torch.no_grad():
            t_out = teacher(ids, **kwargs)
        s_out = student(ids, labels=ids if student_labels else None, **kwargs)
        loss, parts = loss_fn(t_out, s_out)
        if not torch.isfinite(loss):
            raise NumericalFailure(f"{desc} loss became {loss.item()} at step {step}",
                                   "lower budget.lr or check the calibration data")
        opt.zero_grad(set_to_none=True)
        with fp32():  # autocast wraps the forwards and the loss only: backward and the update run outside it
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", **{k: f"{v:.3f}" for k, v in parts.items()})
    student.eval()
    return train_record(losses, t0)
