"""`gptq`: GPTQ, "Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(Frantar, Ashkboos, Hoefler, Alistarh; ICLR 2023). Hessian-based column-by-column weight quantization.

Per decoder block, on the calibration windows (through the adapter's block-by-block runner, so only one
block's activations are held): accumulate H = 2/n * sum X X^T for every linear of the block from the same
block input, quantize each weight column in turn and spread its rounding error over the not-yet-quantized
columns with the inverse Hessian (Cholesky form), in lazy batches of `block_size` columns; then run the
quantized block to produce the next block's input. Options as in the reference (IST-DASLab/gptq):
dampening `damp` x mean(diag H), `act_order` (columns by decreasing diag H; groups then follow that order
and the permutation is stored), asymmetric min/max grid per group (group parameters taken from the
weights as updated so far, at the first column of each group, like the reference).

Stored: packed `bits`-bit codes, fp16 scale and packed zero point per (row, group), the column order if
`act_order`. Execution: fake-quant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.compress.gptq import gptq_layer_into, restore_gptq_layer
from bench.compress.hessian import quantize_blockwise
from bench.errors import check_range
from bench.layer_format import LayerFormat
from bench.packed import Packed
from bench.plugins import Method
from bench.quant.activation import ActivationQuantized


@dataclass
class GPTQ(ActivationQuantized, Method):
    name: str = "gptq"
    bits: int = 4
    group_size: int = 128  # -1 = per output channel
    symmetric: bool = False
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = "Frantar et al., GPTQ: Accurate Post-Training Quantization for GPTs (ICLR 2023)"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_range("method.bits", self.bits, 2, 8)
        check_range("method.damp", self.damp, 1e-6, 1.0)
        check_range("method.block_size", self.block_size, 1, 1 << 16)
        self.check_activation_settings()

    def layer_format(self) -> LayerFormat:
        return LayerFormat.int_grid(self.bits, self.group_size, self.symmetric, prefix="gptq", act_order=self.act_order)

    @torch.no_grad()
    def compress(self, model, calib, budget) -> Packed:
        packed = Packed(model.module, self.name, self.execution)

        def quantize_layer(r, H):
            gptq_layer_into(packed, r, H, self.layer_format(), self.bits, self.group_size, self.symmetric,
                            self.act_order, self.damp, self.block_size)

        quantize_blockwise(model.adapter, calib.windows, quantize_layer, self.name)
        packed.info["calib_tokens"] = int(calib.windows.numel())
        return self.runtime_hooks(model, packed)

    def restore_layer(self, model, ref, stored) -> None:
        restore_gptq_layer(ref, stored, self.bits, self.group_size)
