"""`edgeqat`: EdgeQAT, "Entropy and Distribution Guided Quantization-Aware Training for the Acceleration of
Lightweight LLMs on the Edge" (Shen, Kong, Yang, Sun, Chen, Zhuang, Zhao, Wang, Li; 2024; reference code
shawnricecake/EdgeQAT, read and written anew). Quantization-aware training of weights and activations.

Quantizers, as the reference's:
- weights: LSQ, symmetric, one learned step s per tensor, codes in [-2^(b-1), 2^(b-1) - 1], s initialised at
  2 mean|W| / sqrt(Qp), its gradient scaled by 1 / sqrt(numel(W) Qp), straight-through rounding;
- activations (the input of every block linear): LSQ+, a learned step and zero point per tensor, signed if
  the first calibration window's input has negatives, else unsigned; initialised on that window (step
  2 mean|x| / sqrt(Qp), zero 0.1 (min x - s Qn), as the reference); static at inference.
Loss, as the reference's total: 0.5 CE (LM loss on the window) + 0.5 T^2 KL(teacher || student) at
temperature T = 2 + the distribution term + the entropy term:
- distribution: -log S, S = sum over layers and heads of cos(teacher map, student map). The reference
  compares pre-softmax attention logits and adds +log S (which pushes the maps apart, against the paper's
  "distribution guided"); here the attention probabilities (what the adapter exposes) are pulled together;
- entropy: -0.5 log E, E = sum over layers, tokens and heads of log(1 + Var_d(q)) + log(1 + Var_d(k)) (a
  Gaussian entropy proxy that keeps the query/key spread from collapsing under quantization), on the q/k
  projections' outputs (the reference takes them after RoPE, which rotates each head without changing its
  norm).
Every parameter trains (as the reference's trainer), AdamW with steps, lr and weight decay from `budget=`
(`budget=paper` is the reference's recipe). Deviations: the q.k^T and attention.v matmuls are not
quantized (no method in the suite quantizes them); the token-adaptive 4/8-bit activation variant is not
included (the reference never trains it with these losses). Artifact: packed codes + one fp16 step per
weight tensor; each activation quantizer's fp16 step, zero point and sign flag.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.compress.distill import distill, kd_logits
from bench.errors import check_range
from bench.layer_format import ActFormat, LayerFormat
from bench.models import adapter_for, round_to_storage
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.quant import IntQuantized
from bench.quant.integer import fp16_ste, load_int_layer, restore_bias, round_ste, scale_grad, stored_int_layer
from bench.training import TrainingRecord


def act_levels(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def fake_quant_static(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int, signed: bool,
                      grad_scale: float = 1.0) -> torch.Tensor:
    """LSQ+ fake quantization with a learned step and zero point (straight-through rounding)."""
    qn, qp = act_levels(bits, signed)
    x = x.float()  # fp32: a linear's input may be bf16 under autocast (callers cast back or feed a linear)
    s = fp16_ste(scale_grad(step, grad_scale).clamp(min=1e-8))
    z = round_ste(scale_grad(zero, grad_scale))
    return (round_ste(torch.clamp(x / s + z, qn, qp)) - z) * s


class EdgeQATLinear(nn.Module):
    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int):
        super().__init__()
        self.w_bits, self.a_bits = w_bits, a_bits
        self.weight = nn.Parameter(linear.weight.data.float().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.float().clone())
        qp = 2 ** (w_bits - 1) - 1
        self.w_step = nn.Parameter(2 * self.weight.detach().abs().mean() / qp**0.5)
        self.a_step = nn.Parameter(torch.tensor(1.0))
        self.a_zero = nn.Parameter(torch.tensor(0.0))
        self.a_signed = True

    @torch.no_grad()
    def init_activation(self, x: torch.Tensor) -> None:
        x = x.float()  # fp32: activation statistics (the input may be bf16 under autocast)
        self.a_signed = bool(x.min() < -1e-5)
        qn, qp = act_levels(self.a_bits, self.a_signed)
        self.a_step.fill_(float(2 * x.abs().mean() / qp**0.5))
        self.a_zero.fill_(float(0.1 * (x.min() - self.a_step * qn)))

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fake-quantized weight and its signed integer codes."""
        qn, qp = -(2 ** (self.w_bits - 1)), 2 ** (self.w_bits - 1) - 1
        s = fp16_ste(scale_grad(self.w_step, 1 / (self.weight.numel() * qp) ** 0.5).clamp(min=1e-8))
        q = round_ste(torch.clamp(self.weight / s, qn, qp))
        return q * s, q.detach()

    def forward(self, x):
        g = 1 / (x.numel() * act_levels(self.a_bits, self.a_signed)[1]) ** 0.5
        xq = fake_quant_static(x, self.a_step, self.a_zero, self.a_bits, self.a_signed, g)
        return F.linear(xq, self.quantized_weight()[0], self.bias)


def attach_static_act_quant(linear: nn.Module, step: torch.Tensor, zero: torch.Tensor, bits: int,
                            signed: bool) -> None:
    step, zero = step.float(), zero.float()
    linear.register_forward_pre_hook(
        lambda _m, args: (fake_quant_static(args[0], step, zero, bits, signed).to(args[0].dtype), *args[1:]))


@dataclass
class EdgeQAT(Method):
    name: str = "edgeqat"
    bits: int = 4
    act_bits: int = 8
    temperature: float = 2.0
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    distribution_weight: float = 1.0
    entropy_weight: float = 0.5
    seed: int = 0
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = "Shen et al., EdgeQAT: Entropy and Distribution Guided QAT for Lightweight LLMs (2024)"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_range("method.bits", self.bits, 2, 8)
        check_range("method.act_bits", self.act_bits, 2, 16)
        check_range("method.temperature", self.temperature, 1e-3, 100.0)
        for key in ("ce_weight", "kd_weight", "distribution_weight", "entropy_weight"):
            check_range(f"method.{key}", getattr(self, key), 0.0, 1e6)

    def layer_format(self) -> LayerFormat:
        return LayerFormat("int", self.bits, f"edgeqat-w{self.bits}-per_tensor-sym", "tensor", symmetric=True,
                           act=ActFormat(self.act_bits, "int", "per_tensor", "static"))

    def objective(self) -> str:
        return (f"ce = {self.ce_weight:g} x LM loss + kd = {self.kd_weight:g} x T^2 KL(teacher || student) at "
                f"T={self.temperature:g} + dist = {self.distribution_weight:g} x -log(sum of attention-map cosines) + "
                f"ent = {self.entropy_weight:g} x -0.5 log(sum of log(1 + Var) of q/k heads); terms as weighted in "
                "the loss (dist and ent can be negative)")

    def _entropy_hooks(self, adapter, head_dim: int, store: list) -> list:
        """Forward hooks collecting sum log(1 + Var_d) of each head of the q and k projections' outputs."""
        def hook(_m, _args, out):
            heads = out.float().unflatten(-1, (-1, head_dim))
            store.append(torch.log1p(heads.var(dim=-1)).sum())

        return [r.module.register_forward_hook(hook) for r in adapter.linears() if r.role in ("q", "k")]

    def compress(self, model, calib, budget) -> Packed:
        teacher = model.module
        student = copy.deepcopy(teacher)
        adapter = adapter_for(student)
        mods = {}
        for ref in list(adapter.linears()):
            mods[ref.name] = EdgeQATLinear(ref.module, self.bits, self.act_bits)
            adapter.replace_linear(ref, mods[ref.name])
        inits = [m.register_forward_pre_hook(lambda m, a: m.init_activation(a[0])) for m in mods.values()]
        with torch.no_grad():
            student(calib.windows[:1], use_cache=False)  # activation quantizers start from the first window
        for h in inits:
            h.remove()
        config = student.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        spreads: list[torch.Tensor] = []
        hooks = self._entropy_hooks(adapter, head_dim, spreads)

        def loss_fn(t_out, s_out):
            kd = kd_logits(s_out.logits, t_out.logits, self.temperature)
            cos = sum(F.cosine_similarity(a.float().flatten(2), b.float().flatten(2), dim=-1, eps=1e-6).sum()
                      for a, b in zip(s_out.attentions, t_out.attentions))  # fp32: maps may be bf16 under autocast
            distribution = -torch.log(cos)
            entropy = -0.5 * torch.log(sum(spreads))
            spreads.clear()
            loss = (self.ce_weight * s_out.loss + self.kd_weight * kd + self.distribution_weight * distribution
                    + self.entropy_weight * entropy)
            return loss, {"ce": self.ce_weight * s_out.loss.item(), "kd": self.kd_weight * kd.item(),
                          "dist": self.distribution_weight * distribution.item(),
                          "ent": self.entropy_weight * entropy.item()}

        trainable = [p for p in student.parameters()]
        for p in trainable:
            p.requires_grad_(True)
        try:
            with model.adapter.eager_attention(), adapter.eager_attention():
                history = distill(teacher, student, trainable, calib.windows, budget, self.seed, loss_fn,
                                  "edgeqat quantization-aware training", attentions=True, student_labels=True,
                                  heldout=calib.heldout, objective=self.objective())
        finally:
            for h in hooks:
                h.remove()
        for p in student.parameters():
            p.requires_grad_(False)
        packed = Packed(student, self.name, self.execution)
        with torch.no_grad():
            round_to_storage(student, getattr(torch, model.spec.storage_dtype))  # what runs is what is stored
            for ref in list(adapter.linears()):
                m = mods[ref.name]
                deq, q = m.quantized_weight()
                linear = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=m.bias is not None)
                linear.weight.data.copy_(deq)
                if m.bias is not None:
                    linear.bias.data.copy_(m.bias)
                packed.per_layer.append(layer_stats(ref, model.module.get_submodule(ref.name).weight, deq))
                adapter.replace_linear(ref, linear)
                codes = (q + 2 ** (self.bits - 1)).to(torch.uint8)
                stored = stored_int_layer(codes, m.w_step.detach().half().reshape(1, 1), None, self.bits, m.bias)
                stored.update({"act_step": m.a_step.detach().half(), "act_zero": m.a_zero.detach().round().half(),
                               "act_signed": torch.tensor(m.a_signed)})
                packed.layers[ref.name] = stored
                packed.layer_format[ref.name] = self.layer_format()
                attach_static_act_quant(linear, stored["act_step"], stored["act_zero"], self.act_bits, m.a_signed)
        packed.training = TrainingRecord([history])
        packed.info["activations"] = f"a{self.act_bits}-per_tensor-static"
        return packed

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        shape = tuple(ref.module.weight.shape)
        codes, _ = load_int_layer(stored, self.bits, shape)
        ref.module.weight.data.copy_(IntQuantized(codes, stored["scale"], None, self.bits, shape[1], True).dequantize())
        restore_bias(ref.module, stored)
        attach_static_act_quant(ref.module, stored["act_step"], stored["act_zero"], self.act_bits,
                                bool(stored["act_signed"]))
