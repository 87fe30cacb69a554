"""`fp_rtn`: round-to-nearest onto a low-bit floating-point format (FP8 E4M3/E5M2, FP6, FP4 E2M1/E3M0).

The floating-point counterpart of `rtn` and the "MinMax" FP baseline of LLM-FP4 (Liu et al., EMNLP 2023):
per output row and group of input columns, an fp16 scale maps the group's max |w| to the format's largest
value; each weight rounds to the nearest representable value (ties to even, as hardware casts). Stored:
packed sign+exponent+mantissa codes and the fp16 scales. Activations (`act_format=fp4_e2m1`, `act_bits=8`,
...) are quantized dynamically as for `rtn`. Execution: fake-quant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.layer_format import LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.quant import pack_bits, resolve_group_size, unpack_bits
from bench.quant.activation import ActivationQuantized
from bench.quant.floating import FloatQuantized, float_format, quantize_float
from bench.quant.integer import restore_bias, stored_bias


@dataclass
class FloatRTN(ActivationQuantized, Method):
    name: str = "fp_rtn"
    format: str = "fp4_e2m1"
    group_size: int = 128  # -1 = per output channel
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = "FP round-to-nearest baseline (the MinMax FP baseline of Liu et al., LLM-FP4, EMNLP 2023)"

    def __post_init__(self):
        float_format(self.format)  # raises a ConfigError naming the formats
        self.check_activation_settings()

    def layer_format(self) -> LayerFormat:
        return LayerFormat.float_grid(self.format, float_format(self.format).bits, self.group_size)

    @torch.no_grad()
    def compress(self, model, calib, budget) -> Packed:
        packed = Packed(model.module, self.name, self.execution)
        fmt = float_format(self.format)
        for ref in model.adapter.linears():
            w = ref.module.weight.data
            fq = quantize_float(w, fmt, self.group_size, ref.name)
            wq = fq.dequantize()
            packed.per_layer.append(layer_stats(ref, w, wq))
            w.copy_(wq)
            stored = {"qweight": pack_bits(fq.codes, fmt.bits), "scale": fq.scale}
            stored.update(stored_bias(ref.module))
            packed.layers[ref.name] = stored
            packed.layer_format[ref.name] = self.layer_format()
        return self.runtime_hooks(model, packed)

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        out_f, in_f = ref.module.weight.shape
        fmt = float_format(self.format)
        codes = unpack_bits(stored["qweight"], fmt.bits, out_f * in_f, (out_f, in_f))
        g = resolve_group_size(self.group_size, in_f, ref.name)
        ref.module.weight.data.copy_(FloatQuantized(codes, stored["scale"], g, fmt).dequantize())
        restore_bias(ref.module, stored)
