"""Low-bit floating-point formats (FP8 E4M3/E5M2, FP6 E2M3/E3M2, FP4 E2M1/E3M0, any ExMy) and
round-to-nearest quantization onto them.

A format is sign + `exp_bits` exponent + `man_bits` mantissa with an exponent `bias` (default the IEEE-style
2^(E-1) - 1; LLM-FP4 searches it). Exponent field 0 encodes subnormals (0.m x 2^(1-bias)). Special values
follow the OCP Microscaling spec: E5M2 keeps IEEE inf/NaN (top exponent reserved), E4M3 ("fn") reserves
only the all-ones code for NaN (max 448), FP6 and FP4 have no specials (every code is a number).
Quantization saturates at the largest finite value and rounds to the nearest representable value, ties
to the even code (as hardware casts do).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from bench.errors import ConfigError
from bench.quant.integer import expand_groups, group_minmax, resolve_group_size


@dataclass(frozen=True)
class FloatFormat:
    exp_bits: int
    man_bits: int
    bias: int | None = None
    specials: str = "none"  # "none" | "ieee" (top exponent = inf/NaN) | "fn" (only all-ones code = NaN)

    def __post_init__(self):
        if self.exp_bits < 1 or self.man_bits < 0 or self.exp_bits + self.man_bits > 7:
            raise ConfigError(f"float format E{self.exp_bits}M{self.man_bits} is not a 2..8-bit format",
                              "use exp_bits>=1, man_bits>=0 and exp_bits+man_bits<=7")
        if self.specials not in ("none", "ieee", "fn"):
            raise ConfigError(f"float format specials='{self.specials}' is unknown", "use none, ieee or fn")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def exponent_bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1 if self.bias is None else self.bias

    @property
    def name(self) -> str:
        b = "" if self.bias is None else f"b{self.bias}"
        return f"e{self.exp_bits}m{self.man_bits}{b}"

    @cached_property
    def magnitudes(self) -> torch.Tensor:
        """Every non-negative representable value, ascending (float64), in code order."""
        vals = []
        top = 2**self.exp_bits - 1
        for e in range(2**self.exp_bits):
            if self.specials == "ieee" and e == top:
                continue
            for m in range(2**self.man_bits):
                if self.specials == "fn" and e == top and m == 2**self.man_bits - 1:
                    continue
                if e == 0:
                    v = (m / 2**self.man_bits) * 2.0 ** (1 - self.exponent_bias)
                else:
                    v = (1 + m / 2**self.man_bits) * 2.0 ** (e - self.exponent_bias)
                vals.append(v)
        return torch.tensor(vals, dtype=torch.float64)

    @property
    def max_value(self) -> float:
        return float(self.magnitudes[-1])


FORMATS = {
    "fp8_e4m3": FloatFormat(4, 3, specials="fn"),
    "fp8_e5m2": FloatFormat(5, 2, specials="ieee"),
    "fp6_e2m3": FloatFormat(2, 3),
    "fp6_e3m2": FloatFormat(3, 2),
    "fp4_e2m1": FloatFormat(2, 1),
    "fp4_e3m0": FloatFormat(3, 0),
}


def float_format(name: str) -> FloatFormat:
    if name not in FORMATS:
        from bench.errors import unknown_choice

        raise unknown_choice("float format", name, list(FORMATS))
    return FORMATS[name]


def round_to_format(x: torch.Tensor, fmt: FloatFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, codes): x rounded to the nearest value of `fmt` (saturating), and the magnitude index of
    each element (0 .. len(magnitudes)-1; the sign is kept separately by the caller via torch.sign)."""
    mags = fmt.magnitudes.to(torch.float64)
    a = x.detach().abs().to(torch.float64).clamp(max=fmt.max_value)
    hi = torch.searchsorted(mags, a).clamp(max=mags.numel() - 1)  # first grid value >= a
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - mags[lo], mags[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))  # ties to the even code
    idx = torch.where(pick_hi, hi, lo)
    vals = mags[idx] * torch.where(x < 0, -1.0, 1.0).to(torch.float64)
    return vals.to(x.dtype if x.is_floating_point() else torch.float32), idx


def encode_float(x: torch.Tensor, fmt: FloatFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, values): x rounded onto `fmt`; codes are uint8 sign << (E+M) | magnitude index."""
    q, idx = round_to_format(x, fmt)
    sign = (q < 0).to(torch.long) << (fmt.exp_bits + fmt.man_bits)
    return (sign | idx).to(torch.uint8), q


def decode_float(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    width = fmt.exp_bits + fmt.man_bits
    c = codes.long()
    mags = fmt.magnitudes.to(torch.float32)[c & ((1 << width) - 1)]
    return torch.where((c >> width) & 1 == 1, -mags, mags)


@dataclass
class FloatQuantized:
    codes: torch.Tensor  # uint8 (out, in): sign | magnitude index
    scale: torch.Tensor  # fp16 (out, n_groups)
    group_size: int
    fmt: FloatFormat

    def dequantize(self) -> torch.Tensor:
        s = expand_groups(self.scale.to(torch.float32), self.group_size, self.codes.shape[1])
        return decode_float(self.codes, self.fmt) * s


def quantize_float(w: torch.Tensor, fmt: FloatFormat, group_size: int = -1, layer: str = "") -> FloatQuantized:
    """Round-to-nearest of `w` (out, in) onto `fmt` with an fp16 absmax scale per (row, group of columns)
    (group layout as in integer.py)."""
    out, inp = w.shape
    g = resolve_group_size(group_size, inp, layer)
    x = w.detach().to(torch.float32)
    lo, hi = group_minmax(x, g)
    amax = torch.maximum(lo.abs(), hi.abs())
    scale = (amax / fmt.max_value).clamp(min=1e-8).to(torch.float16)
    s = expand_groups(scale.to(torch.float32), g, inp)
    codes, _ = encode_float(x / s, fmt)
    return FloatQuantized(codes, scale, g, fmt)


def fake_quant_float_bias(x: torch.Tensor, exp_bits: int, man_bits: int, bias: torch.Tensor | float) -> torch.Tensor:
    """Round x to the E`exp_bits`M`man_bits` format (no specials) with a real-valued exponent `bias`
    (broadcast against x): largest value (2 - 2^-M) 2^(2^E - 1 - bias), subnormals below exponent field 1,
    ties to even. A non-integer bias is a power-of-two rescaling of the integer-bias format: for integer b0,
    the result equals s * round_to_format(x / s) with s = 2^(b0 - bias). Elementwise and fast (for searches)."""
    bias = torch.as_tensor(bias, dtype=torch.float32)
    dtype, x = x.dtype, x.float()  # fp32: an activation may arrive in bf16 under autocast; returned in its dtype
    maxval = (2 - 2.0 ** -man_bits) * torch.pow(2.0, 2**exp_bits - 1 - bias)
    x = torch.maximum(torch.minimum(x, maxval), -maxval)
    exponent = torch.clamp(torch.floor(torch.log2(x.abs()) + bias), min=1.0)
    step = torch.pow(2.0, exponent - man_bits - bias)
    return (torch.round(x / step) * step).to(dtype)


def round_mantissa(x: torch.Tensor, man_bits: int) -> torch.Tensor:
    """x in float32 rounded to `man_bits` explicit mantissa bits, ties to even, keeping float32's exponent range
    (8 exponent bits; bf16 is man_bits=7). Done on the bit pattern, so it is exact: a mantissa that rounds up past
    its top carries into the exponent, the largest values round to inf, inf stays inf and NaN stays NaN."""
    if not 0 <= man_bits <= 23:
        raise ValueError(f"man_bits={man_bits} is not in 0..23")
    x = x.to(torch.float32)
    if man_bits == 23:
        return x
    drop = 23 - man_bits
    bits = x.view(torch.int32)
    lsb = (bits >> drop) & 1  # the last kept bit: a tie rounds to make it 0
    rounded = ((bits + ((1 << (drop - 1)) - 1) + lsb) & -(1 << drop)).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded)
