"""Knowledge distillation of a compressed student from the uncompressed teacher on the calibration windows:
the loop every distillation-based method shares (BinaryMoS, OneBit, ..., recover=), run by bench.training's
`Trainer` (which records the curve and judges convergence). Steps, batch, lr and warm-up come from `budget=`; the
window order is a seeded permutation, reshuffled each epoch; held-out calibration windows give the validation
loss."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.training import StageRecord, Trainer, budget_adamw, budget_schedule


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


def distill(teacher, student, params, windows: torch.Tensor, budget, seed: int,
            loss_fn: Callable[[object, object], tuple[torch.Tensor, dict[str, float]]], desc: str,
            after_step: Callable[[int], None] | None = None, attentions: bool = False,
            student_labels: bool = False, heldout: torch.Tensor | None = None, objective: str = "",
            tokens_per_sample: int | None = None) -> StageRecord:
    """AdamW (weight decay from `budget=`, default 0) with linear warm-up then cosine decay to 0, on the shared
    `Trainer`; `loss_fn(teacher_out, student_out)` returns the loss and its named terms (recorded per step);
    `after_step(step)` (e.g. a projection onto constraints) runs after each update. `attentions`: both outputs
    carry the attention maps (the caller makes attention eager); `student_labels`: the student's output carries
    its LM loss on the window. `heldout`: windows disjoint from `windows` (bench.calib), whose mean loss, one window
    at a time, is the stage's validation loss; `objective` says what the loss is. Tokens seen count
    `tokens_per_sample` per window (default: the window length of token ids). Returns the stage's record."""
    steps = budget.steps()
    g = torch.Generator().manual_seed(seed)
    opt = budget_adamw(params, budget)
    teacher.eval()
    student.train()
    n, batch = windows.shape[0], budget.batch_size
    order = [torch.randperm(n, generator=g)]  # the current epoch's permutation, redrawn as each epoch ends
    kwargs = {"output_hidden_states": True, "use_cache": False, "output_attentions": attentions}

    def forward(ids):
        with torch.no_grad():
            t_out = teacher(ids, **kwargs)
        return loss_fn(t_out, student(ids, labels=ids if student_labels else None, **kwargs))

    def step_fn(step):
        idx = [order[0][(step * batch + j) % n].item() for j in range(batch)]
        if (step * batch) // n != ((step + 1) * batch - 1) // n:
            order[0] = torch.randperm(n, generator=g)
        return forward(windows[idx])

    def validate():
        student.eval()
        total, terms = 0.0, {}
        with torch.no_grad():
            for ids in heldout.split(1):
                loss, parts = forward(ids)
                total += float(loss)
                for k, v in parts.items():
                    terms[k] = terms.get(k, 0.0) + float(v)
        student.train()
        m = heldout.shape[0]
        return total / m, {k: v / m for k, v in terms.items()}

    if tokens_per_sample is None and windows.dim() == 2 and not windows.is_floating_point():
        tokens_per_sample = windows.shape[1]
    trainer = Trainer(desc, opt, steps, budget_schedule(budget, steps), samples_per_step=batch, train_samples=n,
                      tokens_per_sample=tokens_per_sample, objective=objective, validate=validate,
                      heldout_samples=0 if heldout is None else heldout.shape[0], after_step=after_step,
                      fix="lower budget.lr or check the calibration data")
    record = trainer.run(step_fn)
    student.eval()
    return record
