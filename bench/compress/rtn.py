"""The round-to-nearest integer family: `RTNBase` quantizes every block linear (a conv as its out x (in kh kw)
matrix) onto a `bits`-bit grid per output row and group of input columns, stores packed codes + fp16 scales (+
packed zero points when asymmetric) and adds dynamic activation quantization when `act_bits`/`act_format` is set.
The `rtn` method is it as is; awq and smoothquant transform the weights first (the norm rescaling below is
their shared step: an exact equivalence in real arithmetic, rounded to the stored dtype), then call it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import check_range
from bench.layer_format import LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.quant import IntQuantized, quantize_rtn, resolve_group_size
from bench.quant.activation import ActivationQuantized
from bench.quant.integer import load_int_layer, restore_bias, stored_int_layer, weight_matrix


@dataclass
class RTNBase(ActivationQuantized, Method):
    name: str = "rtn"
    bits: int = 4
    group_size: int = 128  # -1 = per output channel
    symmetric: bool = False
    family: ClassVar[str] = "quantization"
    applies_to: ClassVar[tuple[str, ...]] = ("causal_lm", "image_sr", "image_classifier", "diffusion")

    def __post_init__(self):
        check_range("method.bits", self.bits, 2, 8)
        self.check_activation_settings()

    def layer_format(self) -> LayerFormat:
        return LayerFormat.int_grid(self.bits, self.group_size, self.symmetric)

    @torch.no_grad()
    def compress(self, model, calib, budget) -> Packed:
        packed = Packed(model.module, self.name, self.execution)
        for ref in model.adapter.linears():
            w = weight_matrix(ref.module)
            q = quantize_rtn(w, self.bits, self.group_size, self.symmetric, layer=ref.name)
            stored = stored_int_layer(q.codes, q.scale, q.zero, self.bits, ref.module.bias)
            wq = q.dequantize()
            packed.per_layer.append(layer_stats(ref, w, wq))
            w.copy_(wq)
            packed.layers[ref.name] = stored
            packed.layer_format[ref.name] = self.layer_format()
        return self.runtime_hooks(model, packed)

    def restore_layer(self, model, ref, stored) -> None:
        restore_int_layer(ref, stored, self.bits, self.group_size, self.symmetric)


def stored_int_grid(ref, stored: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool
                    ) -> IntQuantized:
    """The round-to-nearest grid (codes, scales, zero points) that `stored_int_layer` wrote for the layer `ref`."""
    out_f, in_f = weight_matrix(ref.module).shape
    g = resolve_group_size(group_size, in_f, ref.name)
    codes, zero = load_int_layer(stored, bits, (out_f, in_f))
    return IntQuantized(codes, stored["scale"], zero, bits, g, symmetric)


@torch.no_grad()
def restore_int_layer(ref, stored: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool) -> None:
    """Write the weight (and bias) rebuilt from `stored_int_layer`'s tensors of a round-to-nearest grid into `ref`."""
    weight_matrix(ref.module).copy_(stored_int_grid(ref, stored, bits, group_size, symmetric).dequantize())
    restore_bias(ref.module, stored)


@torch.no_grad()
def scale_norm_(norm, s: torch.Tensor, storage: torch.dtype = torch.float16) -> None:
    """Divide a norm's weight (and bias) by s and round to the storage dtype: the artifact stores norms in
    fp16, so the evaluated model must hold exactly the stored values."""
    norm.weight.copy_((norm.weight / s).to(storage).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias / s).to(storage).to(norm.bias.dtype))
