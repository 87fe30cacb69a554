"""`minifloat`: post-training quantization onto low-precision floating-point ("minifloat") formats, the
counterpart of `static_ptq`'s integers, as compared in Aggarwal, Pappalardo, Damsgaard, Franco, Preusser,
Blott, Mitra, "Post-Training Quantization with Low-precision Minifloats and Integers on FPGAs" (FPL 2024,
arXiv 2311.12359).

A format is `eXmY` (sign + X exponent + Y mantissa bits, IEEE-style bias, subnormals, no inf/NaN: every
code a number, 3 to 8 bits) or a named one of `bench.quant.floating` (fp8_e4m3, fp6_e3m2, fp4_e2m1, ...).
Weights: per output channel, an fp16 scale maps clip x max |w| to the format's largest value, the clip
ratio searched per channel (MSE); activations: one calibrated static scale per layer input, the clip ratio
searched on calibration samples (MSE). Everything else as `static_ptq` (first and last layer full
precision by default; stored codes packed at 1 + X + Y bits). Execution: fake-quant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.compress.static_ptq import CLIP_GRID, StaticPTQBase, static_activations
from bench.errors import ConfigError
from bench.layer_format import LayerFormat
from bench.precision import fp32
from bench.quant import pack_bits, unpack_bits
from bench.quant.floating import FORMATS, FloatFormat, decode_float, encode_float, round_to_format


def minifloat(name: str) -> FloatFormat:
    m = re.fullmatch(r"e(\d)m(\d)", name)
    if m:
        e, man = int(m.group(1)), int(m.group(2))
        if e >= 1 and 2 <= 1 + e + man <= 8:
            return FloatFormat(e, man)
    if name in FORMATS:
        return FORMATS[name]
    raise ConfigError(f"minifloat format '{name}' is unknown",
                      f"use eXmY with 1 + X + Y in 3..8 (e.g. e4m3, e2m1) or one of {', '.join(FORMATS)}")


@fp32  # fp32: the clip search and its squared rounding errors
def _scaled_search(x: torch.Tensor, amax: torch.Tensor, fmt: FloatFormat, dim: int | None):
    """The fp16 scale (clip x amax / max value) with the smallest squared rounding error of x, per row
    (dim=1) or for the whole tensor (dim=None)."""
    best_err, best_scale = None, None
    for r in CLIP_GRID:
        scale = (r * amax / fmt.max_value).clamp(min=1e-8).to(torch.float16).float()
        err = (round_to_format(x / scale, fmt)[0] * scale - x).pow(2)
        err = err.sum(dim=dim, keepdim=True) if dim is not None else err.sum()
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    return best_scale


@dataclass
class Minifloat(StaticPTQBase):
    name: str = "minifloat"
    w_format: str = "e4m3"
    a_format: str | None = "e4m3"
    paper: ClassVar[str] = "Aggarwal et al., PTQ with Low-precision Minifloats and Integers on FPGAs (FPL 2024)"

    def __post_init__(self):
        minifloat(self.w_format)
        if self.a_format is not None:
            minifloat(self.a_format)

    def layer_bits(self, model, refs, calib):
        return {r.name: (self.w_format, self.a_format) for r in refs}

    def layer_format(self, w_spec, a_spec) -> LayerFormat:
        grid = LayerFormat.float_grid(w_spec, minifloat(w_spec).bits, -1)
        return grid.with_act(static_activations(a_spec and minifloat(a_spec).bits, a_spec or ""))

    def bit_width(self, w_spec) -> int:
        return minifloat(w_spec).bits

    def quantize_layer(self, w, fmt_name, bias):
        fmt = minifloat(fmt_name)
        x = w.float()
        scale = _scaled_search(x, x.abs().amax(dim=1, keepdim=True), fmt, dim=1)
        codes, _ = encode_float(x / scale, fmt)
        stored = {"qweight": pack_bits(codes, fmt.bits), "scale": scale.to(torch.float16)}
        if bias is not None:
            stored["bias"] = bias.detach().to(torch.float16)
        return decode_float(codes, fmt) * scale, stored

    def restore_weight(self, shape, stored):
        fmt = minifloat(self.w_format)
        codes = unpack_bits(stored["qweight"], fmt.bits, shape[0] * shape[1], shape)
        return decode_float(codes, fmt) * stored["scale"].float()

    def fit_activation(self, samples, fmt_name):
        scale = _scaled_search(samples, samples.abs().max(), minifloat(fmt_name), dim=None)
        return {"act_scale": scale.to(torch.float16).reshape(1)}

    def activation_quantizer(self, stored):
        fmt, s = minifloat(self.a_format), stored["act_scale"][0].float()
        # fp32: the input may be bf16 under autocast; the result is returned in its dtype
        return lambda x: (round_to_format(x.float() / s, fmt)[0] * s).to(x.dtype)
