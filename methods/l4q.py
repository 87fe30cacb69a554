"""`l4q`: L4Q, "Parameter Efficient Quantization-Aware Fine-Tuning on Large Language Models" (Jeon, Kim, Lee,
Lee, Choi, Lee; 2024). Quantization-aware training in which LoRA and the quantizer's parameters train jointly,
and the LoRA update ends up inside the quantized weights.

Every decoder linear computes y = x Q(W0 + (alpha / r) B A)^T with
Q(w) = s (clamp(round(w / s) + z, 0, 2^bits - 1) - z) per (row, group): an asymmetric integer grid whose step
s and offset z are learned (LSQ-style, straight-through rounding), initialised from the group's min/max as
the suite's `rtn`. W0 stays frozen; A (Kaiming-uniform, seeded) and B (zero) train, as do s and z. The loss is
logit KD from the uncompressed model on the calibration windows (the paper fine-tunes on instruction data
with the LM loss; here the suite's shared KD loop keeps every training-based method on the same data);
steps, lr and windows come from `budget=`. At the end W0 + (alpha / r) B A is quantized once more with the
learned s and z: the artifact is a plain integer model (packed codes, fp16 scales, zero codes), no adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.compress.distill import distill, frozen_student, kd_logits
from bench.errors import check_range
from bench.layer_format import LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.precision import fp32
from bench.quant import IntQuantized, quantize_rtn, resolve_group_size
from bench.quant.integer import expand_groups, fp16_ste, load_int_layer, restore_bias, round_ste, stored_int_layer
from bench.training import TrainingRecord


class L4QLinear(nn.Module):
    def __init__(self, linear: nn.Linear, bits: int, group_size: int, rank: int, alpha: float):
        super().__init__()
        w = linear.weight.data.float()
        out_f, in_f = w.shape
        self.bits, self.g = bits, resolve_group_size(group_size, in_f)
        self.register_buffer("w0", w.clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        self.lora_a = nn.Parameter(torch.empty(rank, in_f))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(out_f, rank))
        self.scaling = alpha / rank
        q = quantize_rtn(w, bits, group_size)  # min/max initialisation of step and offset
        self.step = nn.Parameter(q.scale.float())
        self.offset = nn.Parameter(q.zero.float())

    @fp32  # fp32: the quantizer's input W0 + (alpha / r) B A (a matmul autocast would run in bf16)
    def merged(self) -> torch.Tensor:
        return self.w0 + self.scaling * self.lora_b @ self.lora_a

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fake-quantized w and its codes on the learned grid (step rounded to its fp16 storage)."""
        in_f, maxq = w.shape[1], 2**self.bits - 1
        s = expand_groups(self.stored_step(), self.g, in_f)
        z = expand_groups(torch.clamp(round_ste(self.offset), 0, maxq), self.g, in_f)
        codes = torch.clamp(round_ste(w / s) + z, 0, maxq)
        return (codes - z) * s, codes.detach()

    def stored_step(self) -> torch.Tensor:
        """The step as stored (fp16), kept positive; gradients pass through the rounding."""
        s = self.step.clamp(min=1e-6)
        return fp16_ste(s)

    def stored_zero(self) -> torch.Tensor:
        return torch.clamp(self.offset.detach().round(), 0, 2**self.bits - 1).to(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantize(self.merged())[0], self.bias)


@dataclass
class L4Q(Method):
    name: str = "l4q"
    bits: int = 4
    group_size: int = 128
    rank: int = 16
    alpha: float = 32.0
    seed: int = 0
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = "Jeon et al., L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on LLMs (2024)"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_range("method.bits", self.bits, 2, 8)
        check_range("method.rank", self.rank, 1, 4096)
        check_range("method.alpha", self.alpha, 1e-6, 1e6)

    def layer_format(self) -> LayerFormat:
        return LayerFormat.int_grid(self.bits, self.group_size, False, prefix="l4q")

    def _loss(self, t_out, s_out):
        return kd_logits(s_out.logits, t_out.logits), {}

    def compress(self, model, calib, budget) -> Packed:
        teacher = model.module
        torch.manual_seed(self.seed)  # LoRA A initialisation
        student, adapter, final = frozen_student(
            teacher, lambda linear: L4QLinear(linear, self.bits, self.group_size, self.rank, self.alpha))
        trainable = [p for m in final.values() for p in (m.lora_a, m.lora_b, m.step, m.offset)]
        history = distill(teacher, student, trainable, calib.windows, budget, self.seed, self._loss,
                          "l4q quantization-aware training", heldout=calib.heldout,
                          objective="KL(teacher || student) on logits (batchmean)")
        packed = Packed(model.module, self.name, self.execution)
        with torch.no_grad():
            for ref in model.adapter.linears():  # the artifact model: the original linears, quantized weights
                m = final[ref.name]
                merged = m.merged()
                deq, codes = m.quantize(merged)
                w = ref.module.weight.data
                packed.per_layer.append(layer_stats(ref, w, deq))
                w.copy_(deq)
                packed.layers[ref.name] = stored_int_layer(codes.to(torch.uint8), m.stored_step().half(),
                                                           m.stored_zero(), self.bits, ref.module.bias)
                packed.layer_format[ref.name] = self.layer_format()
        packed.training = TrainingRecord([history])
        return packed

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        out_f, in_f = ref.module.weight.shape
        g = resolve_group_size(self.group_size, in_f, ref.name)
        codes, zero = load_int_layer(stored, self.bits, (out_f, in_f))
        ref.module.weight.data.copy_(IntQuantized(codes, stored["scale"], zero, self.bits, g, False).dequantize())
        restore_bias(ref.module, stored)
