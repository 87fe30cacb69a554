"""`onebit`: OneBit, "Towards Extremely Low-bit Large Language Models" (Xu, Han, Yang, Wang, Wang, Zhang, Liu,
Che; NeurIPS 2024; reference code xuyuzhuang11/OneBit). Every decoder linear becomes a 1-bit sign matrix with
two value vectors, trained by knowledge distillation.

    y = LayerNorm( ((x * g) @ sign(W)^T) * h ) + b        (LayerNorm without affine parameters)

Initialisation by Sign-Value-Independent Decomposition (SVID): sign(W) and the rank-1 approximation
|W| ~ h g^T. The reference fits it with NMF; for a non-negative matrix the best rank-1 approximation is the
leading singular pair (Perron-Frobenius: both vectors non-negative), which is what is used here. The latent
weight starts at 0.01 sign(W), its sign passed straight through with the reference's gradient
(1.001 - tanh(w)^2). The output LayerNorm is the reference implementation's (its BitLinear), for stable
training.

Loss (the reference's KD trainer with kd_alpha = 1): KL(teacher || student) on logits ("batchmean") plus
`hidden_scale` x sum over the block inputs of the mean squared distance between L2-normalised teacher and
student hidden states. Trainable: latent weights, g, h, biases; embeddings, norms and head frozen (the
reference fine-tunes every parameter). Steps, lr and data from `budget=` and `calib=`.

Storage: 1 packed bit per weight + g (in) and h (out) in fp16 (+ bias), counted in bits/weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.compress.distill import distill, frozen_student, kd_logits
from bench.errors import check_range
from bench.layer_format import LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.precision import fp32
from bench.quant import pack_bits, unpack_bits
from bench.quant.integer import restore_bias
from bench.training import TrainingRecord

LATENT_INIT = 0.01


class _SignTanhSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (1.001 - torch.tanh(w) ** 2)


class OneBitLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # latent; only its sign is stored
        self.in_factor = nn.Parameter(torch.empty(in_features))  # g
        self.out_scale = nn.Parameter(torch.empty(out_features))  # h
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.frozen = False

    @classmethod
    @torch.no_grad()
    @fp32  # fp32: the SVID initialisation (rank-1 SVD of |W|)
    def from_linear(cls, linear: nn.Linear) -> OneBitLinear:
        w = linear.weight.data.float()
        m = cls(w.shape[1], w.shape[0], linear.bias is not None)
        u, s, vh = torch.linalg.svd(w.abs(), full_matrices=False)
        root = s[0].sqrt()
        sign = 1.0 if float(u[:, 0].sum()) >= 0 else -1.0  # the singular pair's sign is arbitrary
        m.out_scale.copy_(sign * u[:, 0] * root)
        m.in_factor.copy_(sign * vh[0] * root)
        m.weight.copy_(torch.where(w >= 0, LATENT_INIT, -LATENT_INIT))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.data)
        return m

    @torch.no_grad()
    def freeze(self) -> None:
        self.weight.copy_(torch.where(self.weight >= 0, 1.0, -1.0))
        self.requires_grad_(False)
        self.frozen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sign = self.weight if self.frozen else _SignTanhSTE.apply(self.weight)
        y = F.layer_norm(((x * self.in_factor) @ sign.t()) * self.out_scale, (self.out_features,))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


@dataclass
class OneBit(Method):
    name: str = "onebit"
    hidden_scale: float = 1.0  # weight of the normalised hidden-state distance (the reference's kd_beta)
    seed: int = 0
    family: ClassVar[str] = "binarization"
    paper: ClassVar[str] = "Xu et al., OneBit: Towards Extremely Low-bit Large Language Models (NeurIPS 2024)"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_range("method.hidden_scale", self.hidden_scale, 0.0, 1e6)

    def _loss(self, t_out, s_out):
        kd = kd_logits(s_out.logits, t_out.logits)
        hidden = sum((F.normalize(t.float(), dim=-1) - F.normalize(s.float(), dim=-1)).pow(2).sum(-1).mean()
                     for s, t in zip(s_out.hidden_states[:-1], t_out.hidden_states[:-1]))
        return kd + self.hidden_scale * hidden, {"kd": float(kd.detach()),
                                                 "hidden": float(self.hidden_scale * hidden.detach())}

    def compress(self, model, calib, budget) -> Packed:
        teacher = model.module
        student, adapter, layers = frozen_student(teacher, OneBitLinear.from_linear)
        mods = list(layers.values())
        trainable = [p for m in mods for p in m.parameters()]
        history = distill(teacher, student, trainable, calib.windows, budget, self.seed, self._loss,
                          "onebit distillation", heldout=calib.heldout,
                          objective="kd = KL(teacher || student) on logits (batchmean) + hidden = "
                                    f"{self.hidden_scale:g} x sum over block inputs of the squared distance of "
                                    "L2-normalised hidden states (the reference's kd_alpha=1, kd_beta); terms as "
                                    "weighted in the loss")
        packed = Packed(student, self.name, self.execution)
        with torch.no_grad():
            for ref, m in zip(adapter.linears(), mods):
                m.freeze()
                for p in (m.in_factor, m.out_scale, m.bias):
                    if p is not None:
                        p.copy_(p.half().float())  # the evaluated model holds exactly the stored fp16 values
                stored = {"qweight": pack_bits((m.weight > 0).to(torch.uint8), 1),
                          "in_factor": m.in_factor.half(), "out_scale": m.out_scale.half()}
                if m.bias is not None:
                    stored["bias"] = m.bias.half()
                # per-layer error of the linear part (before the output LayerNorm) against the original weight
                effective = m.weight * torch.outer(m.out_scale, m.in_factor)
                packed.per_layer.append(layer_stats(ref, teacher.get_submodule(ref.name).weight, effective))
                packed.layers[ref.name] = stored
                packed.layer_format[ref.name] = LayerFormat.binary("onebit-1bit-svid-fp16+layernorm")
        packed.training = TrainingRecord([history])
        return packed

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        out_f, in_f = ref.module.weight.shape
        m = OneBitLinear(in_f, out_f, "bias" in stored)
        m.weight.copy_(unpack_bits(stored["qweight"], 1, out_f * in_f, (out_f, in_f)).float() * 2 - 1)
        m.in_factor.copy_(stored["in_factor"].float())
        m.out_scale.copy_(stored["out_scale"].float())
        restore_bias(m, stored)
        m.freeze()
        model.adapter.replace_linear(ref, m)
