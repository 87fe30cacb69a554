"""GPTQ's integer grid on the Hessian sweep (Frantar et al., GPTQ, ICLR 2023; reference IST-DASLab/gptq): one
layer's quantization (`gptq_quantize`), the tensors it stores (`stored_gptq_layer`) and the weight rebuilt from them
(`restore_gptq_layer`). Shared by gptq (one width for every layer) and layerwise_bits (a width per block)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.compress.hessian import gptq_sweep, inverse_hessian_factor, without_dead_columns
from bench.packed import layer_stats
from bench.precision import fp32
from bench.quant import n_groups, resolve_group_size
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


@torch.no_grad()
def gptq_layer_into(packed, ref, H: torch.Tensor, fmt, bits: int, group_size: int, symmetric: bool, act_order: bool,
                    damp: float, block_size: int) -> None:
    """GPTQ one block linear in place (the weight becomes its dequantized grid) and keep in `packed` its stored
    tensors, its per-layer record (with the GPTQ loss) and its layer format `fmt`: a `quantize_blockwise` callback's
    body for methods whose weights are plain GPTQ."""
    w = ref.module.weight.data
    res = gptq_quantize(w, H, bits, group_size, symmetric, act_order, damp, block_size, ref.name)
    packed.per_layer.append({**layer_stats(ref, w, res.dequantized), "gptq_loss": res.loss})
    w.copy_(res.dequantized)
    packed.layers[ref.name] = stored_gptq_layer(res, bits, ref.module.bias)
    packed.layer_format[ref.name] = fmt


def stored_gptq_layer(res: GPTQResult, bits: int, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """What a GPTQ-quantized linear stores: packed codes, fp16 scales, packed zero points, bias, the column order."""
    stored = stored_int_layer(res.codes, res.scale, res.zero, bits, bias)
    if res.perm is not None:
        stored["perm"] = res.perm.to(torch.int16 if res.perm.numel() < 2**15 else torch.int32)
    return stored


@torch.no_grad()
def restore_gptq_layer(ref, stored: dict[str, torch.Tensor], bits: int, group_size: int) -> None:
    """Write the weight (and bias) rebuilt from `stored_gptq_layer`'s tensors into the layer `ref`."""
    out_f, in_f = ref.module.weight.shape
    g = resolve_group_size(group_size, in_f, ref.name)
    codes, zero = load_int_layer(stored, bits, (out_f, in_f))
    perm = stored["perm"].to(torch.long) if "perm" in stored else None
    ref.module.weight.data.copy_(dequantize_stored(codes, stored["scale"], zero, perm, bits, g))
    restore_bias(ref.module, stored)
