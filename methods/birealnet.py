"""`birealnet`: Bi-Real Net (Liu, Wu, Luo, Yang, Liu, Cheng; ECCV 2018) binarization of an image model's convs.

Each target conv (first and last kept full precision, `keep_first_last`, the BiBench protocol) runs
sign(x) * B + x: binary activations with the ApproxSign gradient (the derivative of Bi-Real's piecewise
polynomial), binary weights B = scale_r * sign(W_r) per output channel, and the real-valued shortcut around the
binarized conv where its input and output shapes match (the record lists the layers where they do not).
Bi-Real's magnitude-aware weight gradient: scale_r = beta * mean|W_r| is computed from the latent weight, so
the gradient reaches W through the scale as well as through sign (clipped straight-through estimator);
beta is a learned per-layer factor standing in for the BatchNorm these networks lack (it starts at the layer's
mean input magnitude). Trained by distillation from the full-precision model on the calibration images for
`budget=` steps; activation binarization, shortcut, training loop and storage are bench.compress.binary_conv's, shared
with `biper`. Stored: 1 bit per weight + one fp16 scale per output channel (+ bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.compress.binary_conv import BinaryConvMethod, WeightBinarizer
from bench.quant.binary import clipped_sign, signs


class BiRealWeights(WeightBinarizer):
    def __init__(self, kernel: torch.Tensor, act_mag: float):
        super().__init__()
        self.latent = nn.Parameter(kernel.clone())
        self.beta = nn.Parameter(torch.tensor(float(act_mag)))

    def scale(self) -> torch.Tensor:
        return self.beta * self.latent.abs().mean(dim=(1, 2, 3), keepdim=True)

    def forward(self) -> torch.Tensor:
        return self.scale() * clipped_sign(self.latent)

    def sign_bits(self) -> torch.Tensor:
        return signs(self.latent.detach())


@dataclass
class BiRealNet(BinaryConvMethod):
    name: str = "birealnet"
    paper: ClassVar[str] = "Liu et al., Bi-Real Net (ECCV 2018): binary convs with real-valued shortcuts, ApproxSign"

    def make_binarizer(self, kernel, act_mag):
        return BiRealWeights(kernel, act_mag)
