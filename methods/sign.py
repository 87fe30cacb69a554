"""`sign`: naive binarization, W ~ alpha_r * sign(W) with alpha_r = mean |W_r| per output row.

The XNOR-Net/BNN-style baseline that binarization papers start from. sign(0) is taken as +1. Stored as
1 packed bit per weight plus one fp16 scale per output row; execution is fake-quant. A conv is binarized as
its (out, in x kh x kw) matrix (one scale per output channel); on image models the first and the last layer
stay in full precision (`keep_first_last`, the BiBench protocol), and the record says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bench.compress.sign import SignBinarizationBase


@dataclass
class SignBinarization(SignBinarizationBase):
    name: str = "sign"
    paper: ClassVar[str] = "Rastegari et al., XNOR-Net (ECCV 2016): sign with per-row mean-|W| scale"
