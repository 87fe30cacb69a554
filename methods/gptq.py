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

from bench.compress.hessian import gptq_sweep, inverse_hessian_factor, quantize_blockwise, without_dead_columns
from bench.errors import check_range
from bench.layer_format import LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.precision import fp32
from bench.quant import n_groups, resolve_group_size
from bench.quant.activation import ActivationQuantized
from bench.quant.integer import (expand_groups, from_codes, grid_params, load_int_layer, restore_bias,
                                 stored_int_layer, to_codes)


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 (out, in) in original column order
    scale: torch.Tensor  # fp16 (out, n_groups); groups in quantization order
    zero: torch.Tensor | None  # uint8 (out, n_groups)
    perm: torch.Tensor | None  # int64 (in,): quantization order of the columns (act_order)
    dequantized: torch.Tensor  # fp32 (out, in)
    loss: float  # GPTQ's proxy loss sum (w - q)^2 / d^2 / 2


@fp32  # fp32: the whole layer quantization (Hessian, its factor, the sweep)
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128, layer: str = "") -> GPTQResult:
    W, H = without_dead_columns(weight.detach().to(torch.float32), H)
    rows, cols = W.shape
    g = resolve_group_size(group_size, cols, layer)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_factor(H, damp, layer)
    codes = torch.zeros_like(W)
    ng = n_groups(cols, g)
    scales = torch.zeros(rows, ng, dtype=torch.float16)
    zeros = None if symmetric else torch.zeros(rows, ng)
    grid: list = [None, None]

    def quantize_column(c: int, w: torch.Tensor, W: torch.Tensor, _W1: torch.Tensor) -> torch.Tensor:
        if c % g == 0:  # like the reference: the group's range is read from W as updated so far
            gw = W[:, c:c + g]
            grid[:] = grid_params(gw.amin(dim=1), gw.amax(dim=1), bits, symmetric)
            scales[:, c // g] = grid[0]
            if zeros is not None:
                zeros[:, c // g] = grid[1]
        codes[:, c] = to_codes(w, *grid, bits)
        return from_codes(codes[:, c], *grid, bits)

    loss = gptq_sweep(W, Hinv, block_size, quantize_column)
    deq = from_codes(codes, expand_groups(scales, g, cols),
                     None if zeros is None else expand_groups(zeros, g, cols), bits)
    if perm is not None:
        inv = torch.argsort(perm)
        codes, deq = codes[:, inv], deq[:, inv]
    return GPTQResult(codes.to(torch.uint8), scales, None if zeros is None else zeros.to(torch.uint8), perm, deq, loss)


def dequantize_stored(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, perm: torch.Tensor | None,
                      bits: int, g: int) -> torch.Tensor:
    """Rebuild the weight from stored codes: groups run along the quantization order (perm if stored)."""
    cols = codes.shape[1]
    order = perm if perm is not None else torch.arange(cols)
    group_of = torch.empty(cols, dtype=torch.long)
    group_of[order] = torch.arange(cols) // g  # column order[k] belongs to group k // g
    s = scale.to(torch.float32)[:, group_of]
    z = None if zero is None else zero.to(torch.float32)[:, group_of]
    return from_codes(codes.to(torch.float32), s, z, bits)


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
            w = r.module.weight.data
            res = gptq_quantize(w, H, self.bits, self.group_size, self.symmetric, self.act_order, self.damp,
                                self.block_size, r.name)
            packed.per_layer.append({**layer_stats(r, w, res.dequantized), "gptq_loss": res.loss})
            w.copy_(res.dequantized)
            stored = stored_int_layer(res.codes, res.scale, res.zero, self.bits, r.module.bias)
            if res.perm is not None:
                stored["perm"] = res.perm.to(torch.int16 if res.perm.numel() < 2**15 else torch.int32)
            packed.layers[r.name] = stored
            packed.layer_format[r.name] = self.layer_format()

        quantize_blockwise(model.adapter, calib.windows, quantize_layer, self.name)
        packed.info["calib_tokens"] = int(calib.windows.numel())
        return self.runtime_hooks(model, packed)

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        out_f, in_f = ref.module.weight.shape
        g = resolve_group_size(self.group_size, in_f, ref.name)
        codes, zero = load_int_layer(stored, self.bits, (out_f, in_f))
        perm = stored["perm"].to(torch.long) if "perm" in stored else None
        ref.module.weight.data.copy_(dequantize_stored(codes, stored["scale"], zero, perm, self.bits, g))
        restore_bias(ref.module, stored)
