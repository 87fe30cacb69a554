"""`rtn`: round-to-nearest integer weight quantization (per output row, per group of input columns).
Convolutions are quantized as their (out, in x kh x kw) matrix, so `group_size=-1` is per output channel.

The classic baseline of every PTQ paper (e.g. GPTQ's Table 3 "RTN"). Weights are stored as packed
`bits`-bit codes with an fp16 scale per group and, if asymmetric, a `bits`-bit zero point per group;
execution is fake-quant (fp32 matmul on dequantized weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bench.compress.rtn import RTNBase


@dataclass
class RTN(RTNBase):
    name: str = "rtn"
    paper: ClassVar[str] = "Round-to-nearest baseline (as reported in Frantar et al., GPTQ, ICLR 2023)"
