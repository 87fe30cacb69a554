"""Learned-step fake quantizers for quantization-aware training: LSQ (Esser et al., ICLR 2020) for weights and
LSQ+ (Bhalgat et al., CVPRW 2020: a learned step and a learned zero point) for activations, per tensor.

A step's gradient is scaled by 1 / sqrt(numel x Qp) (LSQ's step-size gradient scale), rounding is straight-through,
and the step is rounded to fp16 (its storage) in the forward pass, so the trained forward is the stored one. At
inference an activation quantizer is static: `fake_quant_static` with the stored fp16 step and integer zero point.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.quant.integer import fp16_ste, round_ste, scale_grad


def act_levels(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp): the integer codes of a signed or unsigned `bits`-bit activation grid."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def fake_quant_static(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int, signed: bool,
                      gscale: float = 1.0) -> torch.Tensor:
    """LSQ+ fake quantization (x / s + z rounded and clamped to the grid, then (q - z) s) with straight-through
    rounding, in fp32 (a linear's input may be bf16 under autocast: callers cast back or feed a linear)."""
    qn, qp = act_levels(bits, signed)
    x = x.float()
    s = fp16_ste(scale_grad(step, gscale).clamp(min=1e-8))
    z = round_ste(scale_grad(zero, gscale))
    return (round_ste(torch.clamp(x / s + z, qn, qp)) - z) * s


class LearnedActQuantizer(nn.Module):
    """LSQ+ per-tensor activation quantizer. It initialises itself on the first tensor it sees (the references':
    signed if that tensor has negatives, step 2 mean|x| / sqrt(Qp), zero 0.1 (min x - s Qn)); then its step and
    zero point train. `stored()` gives what an artifact keeps: fp16 step, the zero point rounded (fp16), the sign."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.step = nn.Parameter(torch.tensor(1.0))
        self.zero = nn.Parameter(torch.tensor(0.0))
        self.signed = True
        self.initialized = False

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        x = x.float()  # fp32: activation statistics (the input may be bf16 under autocast)
        self.signed = bool(x.min() < -1e-5)
        qn, qp = act_levels(self.bits, self.signed)
        self.step.fill_(float(2 * x.abs().mean() / qp**0.5))
        self.zero.fill_(float(0.1 * (x.min() - self.step * qn)))
        self.initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self.init_from(x)
        g = 1 / (x.numel() * act_levels(self.bits, self.signed)[1]) ** 0.5
        return fake_quant_static(x, self.step, self.zero, self.bits, self.signed, g).to(x.dtype)

    def stored(self) -> dict[str, torch.Tensor]:
        return {"step": self.step.detach().half(), "zero": self.zero.detach().round().half(),
                "signed": torch.tensor(self.signed)}


def static_quantizer(stored: dict[str, torch.Tensor], bits: int):
    """The inference-time quantizer x -> fake-quantized x of a `LearnedActQuantizer.stored()` dict."""
    step, zero, signed = stored["step"].float(), stored["zero"].float(), bool(stored["signed"])
    return lambda x: fake_quant_static(x, step, zero, bits, signed).to(x.dtype)
