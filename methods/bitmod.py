"""`bitmod`: BitMoD, "Bit-serial Mixture-of-Datatype LLM Acceleration" (Chen, Tong, Zhang, Abdelfattah;
HPCA 2025). Weight-only; each group of weights picks its own low-bit datatype.

The datatypes are low-bit floats (FP4 E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, FP3 {0, 1, 2, 4}, written
x2 as integers) whose redundant code (the negative zero) is re-assigned to one special value: "extra
resolution" (ER: between the two largest magnitudes, 10 for FP4, 3 for FP3) or "extra asymmetry" (EA:
beyond the largest, 16 for FP4, 6 for FP3), on the positive or negative side - four datatypes of exactly
2^bits values. Per (row, group of columns): scale = absmax / max |value| of the datatype (fp16), round
each weight to the nearest value, and keep the datatype with the smallest squared error. Stored: packed
`bits`-bit codes, an fp16 scale and a 2-bit datatype selector per group. Execution: fake-quant (BitMoD's
bit-serial accelerator is a hardware-backend concern).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import check_range
from bench.layer_format import LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.precision import fp32
from bench.quant import pack_bits, resolve_group_size, unpack_bits
from bench.quant.integer import expand_groups, restore_bias, stored_bias

_MAGNITUDES = {3: [0.0, 1.0, 2.0, 4.0], 4: [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]}
_SPECIAL = {3: {"er": 3.0, "ea": 6.0}, 4: {"er": 10.0, "ea": 16.0}}
DATATYPES = ("er_pos", "er_neg", "ea_pos", "ea_neg")  # selector code = index here


def datatype_values(bits: int, name: str) -> torch.Tensor:
    """The 2^bits sorted values of one BitMoD datatype (integer-valued, before scaling)."""
    mags = _MAGNITUDES[bits]
    symmetric = sorted([-m for m in mags[1:]] + mags)
    kind, side = name.split("_")
    special = _SPECIAL[bits][kind] * (1 if side == "pos" else -1)
    return torch.tensor(sorted(symmetric + [special]), dtype=torch.float32)


def _nearest(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value (ties to the lower one)."""
    mids = (values[1:] + values[:-1]) / 2
    return torch.searchsorted(mids, x.contiguous(), right=False)


@fp32  # fp32: the per-group datatype search and its squared errors
def quantize_bitmod(w: torch.Tensor, bits: int, group_size: int, layer: str = ""
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (out, in), fp16 scales (out, groups), selectors uint8 (out, groups), dequantized fp32)."""
    out_f, in_f = w.shape
    g = resolve_group_size(group_size, in_f, layer)
    x = w.detach().to(torch.float32)
    tables = torch.stack([datatype_values(bits, d) for d in DATATYPES])  # (4, 2^bits)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    deq = torch.zeros_like(x)
    n_groups = (in_f + g - 1) // g
    scales = torch.zeros(out_f, n_groups, dtype=torch.float16)
    selectors = torch.zeros(out_f, n_groups, dtype=torch.uint8)
    for gi in range(n_groups):
        cols = slice(gi * g, min((gi + 1) * g, in_f))
        xg = x[:, cols]
        amax = xg.abs().amax(dim=1, keepdim=True)
        best_err = torch.full((out_f,), float("inf"))
        for d, values in enumerate(tables):
            scale = (amax / values.abs().max()).clamp(min=1e-8).to(torch.float16)
            s = scale.to(torch.float32)
            idx = _nearest(xg / s, values)
            q = values[idx] * s
            err = (q - xg).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            codes[better, cols] = idx[better].to(torch.uint8)
            deq[better, cols] = q[better]
            scales[better, gi] = scale[better, 0]
            selectors[better, gi] = d
    return codes, scales, selectors, deq


def dequantize_bitmod(codes: torch.Tensor, scales: torch.Tensor, selectors: torch.Tensor, bits: int,
                      g: int) -> torch.Tensor:
    tables = torch.stack([datatype_values(bits, d) for d in DATATYPES])
    in_f = codes.shape[1]
    sel = expand_groups(selectors.long(), g, in_f)
    s = expand_groups(scales.to(torch.float32), g, in_f)
    return tables[sel, codes.long()] * s


@dataclass
class BitMoD(Method):
    name: str = "bitmod"
    bits: int = 4
    group_size: int = 128
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = "Chen et al., BitMoD: Bit-serial Mixture-of-Datatype LLM Acceleration (HPCA 2025)"

    def __post_init__(self):
        check_range("method.bits", self.bits, 3, 4)

    @torch.no_grad()
    def compress(self, model, calib, budget) -> Packed:
        packed = Packed(model.module, self.name, self.execution)
        for ref in model.adapter.linears():
            w = ref.module.weight.data
            codes, scales, selectors, deq = quantize_bitmod(w, self.bits, self.group_size, ref.name)
            packed.per_layer.append({**layer_stats(ref, w, deq),
                                     "datatype_share": torch.bincount(selectors.flatten().long(),
                                                                      minlength=4).tolist()})
            w.copy_(deq)
            stored = {"qweight": pack_bits(codes, self.bits), "scale": scales, "selector": pack_bits(selectors, 2)}
            stored.update(stored_bias(ref.module))
            packed.layers[ref.name] = stored
            packed.layer_format[ref.name] = LayerFormat.float_grid(f"fp{self.bits}", self.bits, self.group_size,
                                                                   prefix="bitmod")
        return self.runtime_hooks(model, packed)

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        out_f, in_f = ref.module.weight.shape
        g = resolve_group_size(self.group_size, in_f, ref.name)
        codes = unpack_bits(stored["qweight"], self.bits, out_f * in_f, (out_f, in_f))
        scales = stored["scale"]
        selectors = unpack_bits(stored["selector"], 2, scales.numel(), scales.shape)
        ref.module.weight.data.copy_(dequantize_bitmod(codes, scales, selectors, self.bits, g))
        restore_bias(ref.module, stored)
