"""`binarymos`: BinaryMoS, "Mixture of Scales: Memory-Efficient Token-Adaptive Binarization for Large
Language Models" (Jo et al., NeurIPS 2024, arXiv:2406.12311).

Every decoder linear layer becomes sign(W) with `n_experts` scaling experts for input and output channels.
A router (a bias-free linear on the token's input, softmax over experts) mixes the experts per token:

    p = softmax(x R^T);  s_in = p S_in;  s_out = p S_out
    y = ((x * s_in) @ sign(W)^T) * s_out + b

Experts are initialised from the rank-1 SVD of |W| (|W| ~ sqrt(s1) u1 (sqrt(s1) v1)^T, every expert the
same), the router randomly (seeded). The student is trained by knowledge distillation from the
uncompressed model: KL(teacher || student) on logits (reduction "batchmean", as the reference code) plus
`l2l_scale` x the sum over blocks of the MSE between hidden states, with a straight-through estimator for
sign (gradient passed where |W| < 1). Trainable: the latent weights, experts and routers; embeddings, norms
and head stay frozen. AdamW with cosine schedule and warm-up; steps, lr and data come from `budget=` and
`calib=`.

Storage: 1 packed bit per weight + S_in (E x in), S_out (E x out) and R (E x in) in fp16 (+ bias), all
counted in bits per weight. Execution is fake-quant (fp32 matmul with a +/-1 matrix).
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
from bench.quant.binary import clipped_sign, signs
from bench.training import TrainingRecord


class BinaryMoSLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, n_experts: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.n_experts = in_features, out_features, n_experts
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # latent; only its sign is stored
        self.in_scale = nn.Parameter(torch.empty(n_experts, in_features))
        self.out_scale = nn.Parameter(torch.empty(n_experts, out_features))
        self.router = nn.Linear(in_features, n_experts, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.frozen = False  # after training the latent weight holds sign(W) itself

    @classmethod
    @torch.no_grad()
    @fp32  # fp32: the experts' initialisation (rank-1 SVD of |W|)
    def from_linear(cls, linear: nn.Linear, n_experts: int) -> BinaryMoSLinear:
        w = linear.weight.data.float()
        m = cls(w.shape[1], w.shape[0], n_experts, linear.bias is not None)
        m.weight.copy_(w)
        u, s, vh = torch.linalg.svd(w.abs(), full_matrices=False)
        root = s[0].sqrt()
        m.out_scale.copy_((u[:, 0] * root).expand(n_experts, -1))
        m.in_scale.copy_((vh[0] * root).expand(n_experts, -1))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.data)
        return m

    def sign_matrix(self) -> torch.Tensor:
        return self.weight if self.frozen else clipped_sign(self.weight, inclusive=False)

    @torch.no_grad()
    def freeze(self) -> None:
        """After training: replace the latent weight by its sign (all that is stored) and stop training."""
        self.weight.copy_(signs(self.weight))
        self.requires_grad_(False)
        self.frozen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32).to(x.dtype)
        s_in = probs @ self.in_scale
        s_out = probs @ self.out_scale
        y = ((x * s_in) @ self.sign_matrix().t()) * s_out
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.n_experts}, bias={self.bias is not None}"


@dataclass
class BinaryMoS(Method):
    name: str = "binarymos"
    n_experts: int = 4
    l2l_scale: float = 10.0  # weight of the hidden-state MSE term (reference code default)
    seed: int = 0
    family: ClassVar[str] = "binarization"
    paper: ClassVar[str] = "Jo et al., Mixture of Scales: Memory-Efficient Token-Adaptive Binarization for LLMs (NeurIPS 2024)"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_range("method.n_experts", self.n_experts, 1, 64)
        if self.l2l_scale < 0:
            raise ValueError("l2l_scale must be >= 0")

    def compress(self, model, calib, budget) -> Packed:
        teacher = model.module
        torch.manual_seed(self.seed)  # router initialisation
        student, s_adapter, layers = frozen_student(
            teacher, lambda linear: BinaryMoSLinear.from_linear(linear, self.n_experts))
        mos = list(layers.values())
        trainable = [p.requires_grad_(True) for m in mos for p in m.parameters()]  # the original bias too

        history = distill(teacher, student, trainable, calib.windows, budget, self.seed, self._loss,
                          "binarymos distillation", heldout=calib.heldout, objective=self.objective())
        packed = Packed(student, self.name, self.execution)
        with torch.no_grad():
            for ref, m in zip(s_adapter.linears(), mos):
                # Only sign(W) is stored and the experts/router/bias in fp16: the evaluated model is the artifact.
                m.freeze()
                for p in (m.in_scale, m.out_scale, m.router.weight, m.bias):
                    if p is not None:
                        p.copy_(p.to(torch.float16).float())
                stored = {"qweight": pack_bits((m.weight > 0).to(torch.uint8), 1),
                          "in_scale": m.in_scale.to(torch.float16), "out_scale": m.out_scale.to(torch.float16),
                          "router": m.router.weight.to(torch.float16)}
                if m.bias is not None:
                    stored["bias"] = m.bias.to(torch.float16)
                w0 = teacher.get_submodule(ref.name).weight
                # per-layer error of the token-averaged effective weight (experts mixed uniformly)
                eff = m.weight * torch.outer(m.out_scale.mean(0), m.in_scale.mean(0))
                packed.per_layer.append(layer_stats(ref, w0, eff))
                packed.layers[ref.name] = stored
                packed.layer_format[ref.name] = LayerFormat.binary(f"binarymos-1bit-{self.n_experts}experts-fp16")
        packed.training = TrainingRecord([history])
        return packed

    def objective(self) -> str:
        return (f"kd = KL(teacher || student) on logits (batchmean) + hidden_mse = {self.l2l_scale:g} x sum over "
                "blocks of MSE(student, teacher hidden states) (the reference kd_utils.py); terms as weighted in "
                "the loss")

    def _loss(self, t_out, s_out):
        kd = kd_logits(s_out.logits, t_out.logits)
        l2l = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(s_out.hidden_states[1:], t_out.hidden_states[1:]))
        return kd + self.l2l_scale * l2l, {"kd": float(kd.detach()),
                                           "hidden_mse": float(self.l2l_scale * l2l.detach())}

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        out_f, in_f = ref.module.weight.shape
        m = BinaryMoSLinear(in_f, out_f, self.n_experts, "bias" in stored)
        bits = unpack_bits(stored["qweight"], 1, out_f * in_f, (out_f, in_f))
        m.weight.copy_(bits.float() * 2 - 1)
        m.in_scale.copy_(stored["in_scale"].float())
        m.out_scale.copy_(stored["out_scale"].float())
        m.router.weight.copy_(stored["router"].float())
        if "bias" in stored:
            m.bias.copy_(stored["bias"].float())
        m.freeze()
        model.adapter.replace_linear(ref, m)
