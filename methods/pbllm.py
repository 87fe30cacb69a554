"""`pbllm`: PB-LLM, "Partially Binarized Large Language Models" (Shang, Yuan, Wu, Dong; ICLR 2024; reference
code hahnyuan/PB-LLM, `gptq_pb`). Post-training partial binarization with GPTQ (the paper's PB-GPTQ).

Per linear, on Hessians gathered block by block through the adapter:
1. Salient weights: the `salient_fraction` of weights with the largest OBS saliency w^2 / d_j^2 (d = diagonal
   of the upper Cholesky factor of H^-1), chosen per column group of `group_size` (-1: the whole layer),
   unstructured.
2. The rest are binarized per row and group as w ~ a * sign(w - m) + m, with m and a the mean and mean
   absolute deviation of the row's binarized weights (the reference's `xnor` quantizer, fixed before the
   GPTQ sweep; it averages over the zeroed salient entries too, here only the binarized ones count).
3. Salient weights go to `salient_bits`-bit asymmetric integers on a per-row min/max grid of the whole row.
4. GPTQ's column sweep quantizes each column with the rule of each weight's mask and spreads the error over
   the columns not yet quantized.

Stored and counted in bits/weight: a 1-bit salient bitmap per weight, one sign bit per binarized weight,
`salient_bits` per salient weight, fp16 (a, m) per row and group, fp16 scale and a zero code per row for
the salient grid. The paper's headline bits (e.g. 0.9 x 1 + 0.1 x 8 = 1.7) leave out the bitmap and scales.
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
from bench.quant import n_groups, pack_bits, resolve_group_size, unpack_bits
from bench.quant.binary import binarize_rows
from bench.quant.integer import expand_groups, from_codes, grid_params, restore_bias, stored_bias, to_codes


@fp32  # fp32: Hessian factor, saliency and the GPTQ column sweep
def pbllm_quantize(weight: torch.Tensor, H: torch.Tensor, salient_fraction: float, salient_bits: int,
                   group_size: int, damp: float, block_size: int = 128, layer: str = ""):
    W, H = without_dead_columns(weight.detach().to(torch.float32), H)
    rows, cols = W.shape
    g = resolve_group_size(group_size, cols, layer)
    Hinv = inverse_hessian_factor(H, damp, layer)
    d = torch.diag(Hinv)
    salient = torch.zeros_like(W, dtype=torch.bool)
    ng = n_groups(cols, g)
    binary_params = torch.zeros(rows, ng, 2)
    for gi in range(ng):
        c = slice(gi * g, min((gi + 1) * g, cols))
        score = W[:, c].pow(2) / d[c].pow(2)[None, :]
        k = int(round(salient_fraction * score.numel()))
        if k:
            mask = torch.zeros(score.numel(), dtype=torch.bool)
            mask[torch.topk(score.flatten(), k).indices] = True
            salient[:, c] = mask.view(score.shape)
        binary_params[:, gi] = binarize_rows(W[:, c], ~salient[:, c])[2]
    scale, zero = grid_params(W.amin(dim=1), W.amax(dim=1), salient_bits, False)  # per row, whole row
    codes = torch.zeros(rows, cols)
    positive = torch.zeros(rows, cols, dtype=torch.bool)

    def quantize_column(c: int, w: torch.Tensor, _W: torch.Tensor, _W1: torch.Tensor) -> torch.Tensor:
        a, m = binary_params[:, c // g, 0], binary_params[:, c // g, 1]
        positive[:, c] = w >= m
        binary = torch.where(positive[:, c], a, -a) + m
        codes[:, c] = to_codes(w, scale, zero, salient_bits)
        high = from_codes(codes[:, c], scale, zero, salient_bits)
        return torch.where(salient[:, c], high, binary)

    loss = gptq_sweep(W, Hinv, block_size, quantize_column)
    deq = dequantize_pbllm(salient, positive[~salient], codes[salient].to(torch.uint8), binary_params.half(),
                           scale, zero, salient_bits, g)
    stored = {"salient": pack_bits(salient, 1), "sign": pack_bits(positive[~salient], 1),
              "qsalient": pack_bits(codes[salient].to(torch.uint8), salient_bits),
              "binary_params": binary_params.to(torch.float16), "scale": scale,
              "qzero": pack_bits(zero.to(torch.uint8), salient_bits)}
    return deq, stored, loss


def dequantize_pbllm(salient, signs, salient_codes, binary_params, scale, zero, bits, g) -> torch.Tensor:
    rows, cols = salient.shape
    p = expand_groups(binary_params.to(torch.float32), g, cols)
    out = torch.empty(rows, cols)
    a, m = p[..., 0][~salient], p[..., 1][~salient]
    out[~salient] = torch.where(signs, a, -a) + m
    row_of = torch.arange(rows)[:, None].expand(rows, cols)[salient]
    out[salient] = from_codes(salient_codes.to(torch.float32), scale[row_of], zero[row_of], bits)
    return out


@dataclass
class PBLLM(Method):
    name: str = "pbllm"
    salient_fraction: float = 0.1  # kept at salient_bits (the paper's headline setting: 10% at 8 bits)
    salient_bits: int = 8
    group_size: int = -1  # columns per group for the salient selection and binarization scales
    damp: float = 0.01
    block_size: int = 128
    family: ClassVar[str] = "binarization"
    paper: ClassVar[str] = "Shang et al., PB-LLM: Partially Binarized Large Language Models (ICLR 2024)"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_range("method.salient_fraction", self.salient_fraction, 0.0, 0.5)
        check_range("method.salient_bits", self.salient_bits, 2, 8)
        check_range("method.damp", self.damp, 1e-6, 1.0)

    @torch.no_grad()
    def compress(self, model, calib, budget) -> Packed:
        packed = Packed(model.module, self.name, self.execution)

        def quantize_layer(r, H):
            w = r.module.weight.data
            deq, stored, loss = pbllm_quantize(w, H, self.salient_fraction, self.salient_bits, self.group_size,
                                               self.damp, self.block_size, r.name)
            packed.per_layer.append({**layer_stats(r, w, deq), "gptq_loss": loss})
            w.copy_(deq)
            packed.layers[r.name] = {**stored, **stored_bias(r.module)}
            packed.layer_format[r.name] = LayerFormat.binary(
                f"pbllm-binary+int{self.salient_bits}-{self.salient_fraction:g}salient")

        quantize_blockwise(model.adapter, calib.windows, quantize_layer, self.name)
        return packed

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        rows, cols = ref.module.weight.shape
        g = resolve_group_size(self.group_size, cols, ref.name)
        salient = unpack_bits(stored["salient"], 1, rows * cols, (rows, cols)).bool()
        n_sal = int(salient.sum())
        signs = unpack_bits(stored["sign"], 1, rows * cols - n_sal).bool()
        codes = unpack_bits(stored["qsalient"], self.salient_bits, n_sal)
        zero = unpack_bits(stored["qzero"], self.salient_bits, rows).to(torch.float32)
        ref.module.weight.data.copy_(dequantize_pbllm(salient, signs, codes, stored["binary_params"], stored["scale"],
                                                      zero, self.salient_bits, g))
        restore_bias(ref.module, stored)
