"""`dbllm`: DB-LLM, "Accurate Dual-Binarization for Efficient LLMs" (Chen, Lv, Ding, Qin, Zhou, Ding, Liu,
Zhang, Guo, Liu, Tao; 2024). Quantization-aware training of 2-bit weights held as two binary planes.

Flexible Dual Binarization (FDB), per (row, group) of every decoder linear:

    w_hat = a1 * b1 + a2 * b2,   b1 = H(w - (a1 + a2) / 2),   b2 = H(-(w - a1 * b1 - a2 / 2))

with b1, b2 in {0, 1}, H the unit step (H(0) = 1) and the scales a1, a2 learned, initialised a1 = 2s,
a2 = -s from the step s of a 2-bit grid. The four levels are {a2, 0, a1 + a2, a1} (at init {-s, 0, s, 2s});
b1 = b2 = 0 is an exact zero, the sparsity the paper keeps. s starts at the value minimising the group's
squared error on that grid (a search over s, as the clipping searches of the suite's other quantizers).
Latent weights and scales train; the planes pass gradients straight through inside [min, max] level.

Deviation-Aware Distillation (DAD): the paper's macro-level loss weighs the distillation of each sample by
its ambiguity, so the tokens where the teacher is uncertain (where the quantized model's predictions
deviate most) count more. The exact equation is in no stored material (the reference repository,
Hon-Chen/DB-LLM, holds only a README), so its simplest reading is used: per token, KL(teacher || student)
weighted by the teacher's predictive entropy to the power `dad_gamma`, the weights normalised to mean 1
over the batch (`dad_gamma=0` is plain KD, the ablation). The paper trains on teacher-generated data; the
suite trains every distillation method on the same `calib=` windows with steps and lr from `budget=`.

Storage: two packed bit planes per weight + a1, a2 in fp16 per (row, group): 2 + 32 / group_size bits per
weight. Execution: fake-quant (the planes are dequantized into a dense matrix; no bitwise kernel runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.compress.distill import distill, frozen_student
from bench.errors import check_range
from bench.layer_format import LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.precision import fp32
from bench.quant import pack_bits, resolve_group_size, unpack_bits
from bench.quant.integer import expand_groups, fp16_ste, n_groups, restore_bias, stored_bias
from bench.training import TrainingRecord

INIT_GRID = torch.linspace(0.05, 1.0, 96)  # candidate s as fractions of the group's max |w|


def dual_planes(w: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FDB's two {0, 1} planes of w (a1, a2 broadcast against w)."""
    b1 = (w - (a1 + a2) / 2 >= 0).to(w.dtype)
    b2 = (-(w - a1 * b1 - a2 / 2) >= 0).to(w.dtype)
    return b1, b2


def grouped(x: torch.Tensor, g: int) -> torch.Tensor:
    """(out, in) -> (out, n_groups, g), the ragged last group padded with zeros (a zero is exact on the grid:
    it adds no error to the init search)."""
    out, inp = x.shape
    pad = n_groups(inp, g) * g - inp
    return F.pad(x, (0, pad)).reshape(out, -1, g)


@fp32  # fp32: the initial step search and its squared errors
def init_step(w: torch.Tensor, g: int) -> torch.Tensor:
    """Per (row, group) s minimising || w - FDB(w; 2s, -s) ||^2 over INIT_GRID * max |w|."""
    x = grouped(w, g)  # (out, ng, g)
    amax = x.abs().amax(-1, keepdim=True).clamp(min=1e-8)
    best_err, best_s = None, None
    for frac in INIT_GRID:
        s = amax * frac
        b1, b2 = dual_planes(x, 2 * s, -s)
        err = (x - 2 * s * b1 + s * b2).pow(2).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_s = err, s
        else:
            better = err < best_err
            best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
    return best_s.squeeze(-1)


class DualBinaryLinear(nn.Module):
    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        w = linear.weight.data.float()
        self.g = resolve_group_size(group_size, w.shape[1])
        self.weight = nn.Parameter(w.clone())  # latent weight
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        s = init_step(w, self.g)
        self.alpha1 = nn.Parameter(2 * s)
        self.alpha2 = nn.Parameter(-s)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """a1, a2 as stored (fp16), expanded to the weight's columns; gradients pass the rounding."""
        in_f = self.weight.shape[1]
        return tuple(expand_groups(fp16_ste(a), self.g, in_f) for a in (self.alpha1, self.alpha2))

    def quantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dequantized weight (straight-through to the latent weight inside the level range) and the planes."""
        w = self.weight
        a1, a2 = self.scales()
        b1, b2 = dual_planes(w.detach(), a1.detach(), a2.detach())
        levels = torch.stack([torch.zeros_like(a1), a1, a2, a1 + a2]).detach()
        inside = (w >= levels.amin(0)) & (w <= levels.amax(0))
        w_hat = a1 * b1 + a2 * b2 + (w - w.detach()) * inside
        return w_hat, b1, b2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantize()[0].to(x.dtype), self.bias)


def teacher_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class DBLLM(Method):
    name: str = "dbllm"
    group_size: int = 64
    dad_gamma: float = 1.0  # power of the teacher entropy weighing each token's KD; 0 = plain KD
    seed: int = 0
    family: ClassVar[str] = "binarization"
    paper: ClassVar[str] = "Chen et al., DB-LLM: Accurate Dual-Binarization for Efficient LLMs (2024)"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_range("method.dad_gamma", self.dad_gamma, 0.0, 16.0)
        if self.group_size not in (-1, 0):
            check_range("method.group_size", self.group_size, 1, 1 << 20)

    def layer_format(self) -> LayerFormat:
        g = "ch" if self.group_size in (-1, 0) else f"g{self.group_size}"
        return LayerFormat.binary(f"dual-binary-2x1bit-{g}-fp16", planes=2)

    def _loss(self, t_out, s_out):
        t, s = t_out.logits.float(), s_out.logits.float()
        kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)  # per token
        weight = teacher_entropy(t).pow(self.dad_gamma)
        weight = weight / weight.mean().clamp(min=1e-8)
        loss = (weight * kl).sum() / t.shape[0]  # "batchmean", as the suite's kd_logits
        return loss, {"kd_dad": float(loss.detach()), "kd": float(kl.sum().detach() / t.shape[0])}

    def compress(self, model, calib, budget) -> Packed:
        teacher = model.module
        student, adapter, final = frozen_student(teacher, lambda linear: DualBinaryLinear(linear, self.group_size))
        trainable = [p for m in final.values() for p in (m.weight, m.alpha1, m.alpha2)]
        history = distill(teacher, student, trainable, calib.windows, budget, self.seed, self._loss,
                          "dbllm dual-binarization distillation", heldout=calib.heldout,
                          objective=f"kd_dad = per-token KL(teacher || student) weighted by teacher entropy^"
                                    f"{self.dad_gamma:g} (weights mean 1 per batch), summed / batch: the loss; kd = "
                                    "the same KL unweighted (plain KD, shown beside it, not added)")
        packed = Packed(model.module, self.name, self.execution)
        zeros = 0.0
        with torch.no_grad():
            for ref in model.adapter.linears():  # the artifact model: the original linears, dequantized
                m = final[ref.name]
                w_hat, b1, b2 = m.quantize()
                w = ref.module.weight.data
                packed.per_layer.append(layer_stats(ref, w, w_hat))
                zeros += float(((b1 == 0) & (b2 == 0)).float().sum())
                w.copy_(w_hat)
                packed.layers[ref.name] = {"plane1": pack_bits(b1.to(torch.uint8), 1),
                                           "plane2": pack_bits(b2.to(torch.uint8), 1),
                                           "alpha1": m.alpha1.half(), "alpha2": m.alpha2.half(),
                                           **stored_bias(ref.module)}
                packed.layer_format[ref.name] = self.layer_format()
        packed.training = TrainingRecord([history])
        packed.info["zero_fraction"] = zeros / model.adapter.n_block_linear_weights()
        return packed

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        out_f, in_f = ref.module.weight.shape
        g = resolve_group_size(self.group_size, in_f, ref.name)
        b1, b2 = (unpack_bits(stored[k], 1, out_f * in_f, (out_f, in_f)).float() for k in ("plane1", "plane2"))
        a1, a2 = (expand_groups(stored[k].float(), g, in_f) for k in ("alpha1", "alpha2"))
        ref.module.weight.data.copy_(a1 * b1 + a2 * b2)
        restore_bias(ref.module, stored)
