"""`biper`: BiPer, "Binary Neural Networks using a Periodic Function" (Vargas, Correa, Hinojosa, Arguello;
CVPR 2024), on an image model's convs.

Weights are binarized by a square wave: B = alpha_r * sign(sin(omega * w)) per output channel, and the backward
pass uses the gradient of the sine of the same period (omega * cos(omega * w)), so forward and backward share one
periodic function. alpha_r is learned (the reference's per-channel `alpha`). Training has the reference's two
stages, within the one `budget=`: for the first `stage1_ratio` of the steps the weights are the real-valued
sine alpha * sin(omega * w) (binary activations, real weights), then the square wave; at the switch alpha_r is
multiplied by mean|sin(omega * w_r)|, the least-squares scale of the binarized weights (the projection whose
residual is the paper's quantization error, QE = E[sin^2] - E[|sin|]^2).

Quantization-error-controlled initialization: the paper shows that for latent weights ~ Laplace(0, b) the QE is a
function of b * omega alone (largest, 0.1028, at b * omega ~ 0.955). The latent weights start as the pretrained
kernel rescaled per output channel to b_r * omega = `init_b_omega` (b_r = mean|W_r|, the Laplace scale), which
sets the QE the binarization starts from; the record carries it as predicted for a Laplace law and as measured.
alpha_r starts at b_r / init_b_omega (times the layer's input magnitude), so that alpha * sin(omega * w) ~ W
where the sine is near-linear. Activations, shortcuts, distillation and storage are bench.compress.binary_conv's
(shared with `birealnet`); the reference's optional sin^2 regularizer (tau = 0 in its ImageNet stage 2) is not
used. Stored: 1 bit per weight + one fp16 scale per output channel (+ bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.compress.binary_conv import BinaryConvMethod, WeightBinarizer
from bench.errors import ConfigError
from bench.quant.binary import signs


class _SquareWave(torch.autograd.Function):
    """sign(sin(omega w)) forward, d/dw sin(omega w) = omega cos(omega w) backward."""

    @staticmethod
    def forward(ctx, w, omega):
        ctx.save_for_backward(w)
        ctx.omega = omega
        return signs(torch.sin(omega * w))

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * ctx.omega * torch.cos(ctx.omega * w), None


def laplace_qe(b_omega: float, n: int = 20001) -> float:
    """QE = E[sin^2(omega w)] - E[|sin(omega w)|]^2 for w ~ Laplace(0, b), by quadrature in u = |w| / b."""
    u = torch.linspace(0, 40, n, dtype=torch.float64)
    pdf = torch.exp(-u)  # |w| / b ~ Exp(1)
    s = torch.sin(b_omega * u).abs()
    du = float(u[1] - u[0])
    return float((s**2 * pdf).sum() * du - ((s * pdf).sum() * du) ** 2)


class PeriodicWeights(WeightBinarizer):
    def __init__(self, kernel: torch.Tensor, act_mag: float, omega: float, init_b_omega: float):
        super().__init__()
        self.omega = omega
        b = kernel.abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
        self.latent = nn.Parameter(kernel * (init_b_omega / (omega * b)))
        self.alpha = nn.Parameter(act_mag * b / init_b_omega)
        self.binary = False  # stage 1: real-valued sine; stage 2: square wave

    @torch.no_grad()
    def to_binary(self) -> None:
        self.alpha.mul_(torch.sin(self.omega * self.latent).abs().mean(dim=(1, 2, 3), keepdim=True))
        self.binary = True

    def qe(self) -> float:
        s = torch.sin(self.omega * self.latent.detach())
        return float((s**2).mean() - s.abs().mean() ** 2)

    def scale(self) -> torch.Tensor:
        return self.alpha

    def forward(self) -> torch.Tensor:
        wave = _SquareWave.apply(self.latent, self.omega) if self.binary else torch.sin(self.omega * self.latent)
        return self.alpha * wave

    def sign_bits(self) -> torch.Tensor:
        return signs(torch.sin(self.omega * self.latent.detach()))


@dataclass
class BiPer(BinaryConvMethod):
    name: str = "biper"
    omega: float = 20.0  # frequency of the square wave (the reference's --freq)
    init_b_omega: float = 0.5  # b * omega of the initial latent weights: sets the starting QE
    stage1_ratio: float = 0.5  # share of the budget's steps trained with the real-valued sine
    paper: ClassVar[str] = "Vargas et al., BiPer: Binary Neural Networks using a Periodic Function (CVPR 2024)"

    def __post_init__(self):
        if not self.omega > 0:
            raise ConfigError(f"method.omega={self.omega} must be positive", "e.g. method.omega=20 (the reference)")
        if not 0 < self.init_b_omega <= math.pi:
            raise ConfigError(f"method.init_b_omega={self.init_b_omega} is out of range",
                              "use a value in (0, pi], e.g. 0.5")
        if not 0 <= self.stage1_ratio < 1:
            raise ConfigError(f"method.stage1_ratio={self.stage1_ratio} is out of range",
                              "use a value in [0, 1): the rest of the steps train the square wave")

    def make_binarizer(self, kernel, act_mag):
        return PeriodicWeights(kernel, act_mag, self.omega, self.init_b_omega)

    def stages(self, steps: int) -> list[tuple[str, int]]:
        return [("biper stage 1 (sine weights)", 0), ("biper stage 2 (binary weights)", int(self.stage1_ratio * steps))]

    def on_step(self, step, steps, layers) -> None:
        if step == 0:
            self._qe_start = sum(m.binarizer.qe() for m in layers) / len(layers)
        if step == int(self.stage1_ratio * steps):
            for m in layers:
                m.binarizer.to_binary()

    def compress(self, model, calib, budget):
        packed = super().compress(model, calib, budget)
        packed.info.update({"qe_laplace_predicted": laplace_qe(self.init_b_omega), "qe_measured_start": self._qe_start,
                            "stage1_steps": int(self.stage1_ratio * budget.steps())})
        return packed
