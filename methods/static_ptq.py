"""`static_ptq`: calibration-based post-training quantization of conv and linear layers with static
activation ranges: the integer-deployment recipe (TensorRT / PyTorch static PTQ) that SR quantization papers
(e.g. PTQ4SR, 2DQuant) start from, so W8A8, W4A8 and W4A4 are configs of one method.

- Weights: signed `w_bits` integers, symmetric, one scale per output channel (a conv's out x in x kh x kw
  weight as an out x (in kh kw) matrix); the scale's clipping ratio is searched per channel (MSE).
- Activations (`a_bits`, null = fp32): the input of every quantized layer gets one static asymmetric range
  per tensor, calibrated on `calib=` images (LR patches for SR, crops for classifiers; for diffusion models the
  (x_t, t) their sampler meets from `calib=ddpm_noise8` noise): [lo, hi] =
  r x [min, max] with r from a grid, minimising the squared error of the quantized calibration activations
  (an MSE observer on a seeded subsample of each batch plus its exact min and max), on the model with its
  weights quantized.
- `keep_first_last`: the first and the last layer stay in full precision (the usual SR-quantization
  setting); the record says which layers did.
Stored: packed codes + fp16 per-channel scales + fp16 bias, and per layer its bit-widths, the activation
scale (fp16) and zero point (uint8). Execution: fake-quant (fp32 convs on dequantized values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bench.compress.static_ptq import StaticPTQBase


@dataclass
class StaticPTQ(StaticPTQBase):
    name: str = "static_ptq"
    paper: ClassVar[str] = "Static post-training quantization (per-channel weights, calibrated per-tensor activations)"
