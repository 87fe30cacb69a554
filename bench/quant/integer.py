"""Integer round-to-nearest quantization of weight matrices, per output row and per input-column group.

Groups follow GPTQ's reference semantics: consecutive runs of `group_size` input columns, the last group
shorter when `group_size` does not divide the width (e.g. g128 on a 576-wide layer = 4 x 128 + 1 x 64).
Scales are stored in fp16; dequantized values are computed from the fp16 scale so that the fake-quant model
and an artifact reload agree bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.errors import ConfigError, check_range
from bench.quant.bitpack import pack_bits, unpack_bits


@dataclass
class IntQuantized:
    codes: torch.Tensor  # uint8 (out, in), values in [0, 2^bits)
    scale: torch.Tensor  # fp16 (out, n_groups)
    zero: torch.Tensor | None  # uint8 (out, n_groups): code of real zero (asymmetric); None if symmetric
    bits: int
    group_size: int  # columns per group (== in_features for per-channel)
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        s = expand_groups(self.scale.to(torch.float32), g, self.codes.shape[1])
        if self.symmetric:
            z = float(2 ** (self.bits - 1))
        else:
            z = expand_groups(self.zero.to(torch.float32), g, self.codes.shape[1])
        return (self.codes.to(torch.float32) - z) * s


def weight_matrix(module) -> torch.Tensor:
    """A layer's weight as the (out, in) matrix quantizers work on: a view, so writing it writes the layer
    (a conv's (out, in, kh, kw) weight becomes (out, in x kh x kw))."""
    w = module.weight.data
    return w if w.dim() == 2 else w.view(w.shape[0], -1)


def resolve_group_size(group_size: int, in_features: int, layer: str = "") -> int:
    if group_size in (-1, 0, None):
        return in_features
    if group_size < 0 or group_size > in_features:
        raise ConfigError(f"group_size={group_size} does not fit in_features={in_features} of {layer or 'a layer'}",
                          "use a positive group size up to the layer width, or -1 for per-channel")
    return group_size


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def expand_groups(per_group: torch.Tensor, g: int, cols: int) -> torch.Tensor:
    """A per-(row, group) tensor (out, n_groups) spread over the columns it covers (out, cols), the ragged
    last group cut to the layer width."""
    return per_group.repeat_interleave(g, dim=1)[:, :cols]


def group_minmax(x: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) min and max over a possibly ragged last group."""
    out, inp = x.shape
    ng = n_groups(inp, g)
    pad = ng * g - inp
    if pad:  # repeat the last column, which belongs to the last group: its min/max are unchanged
        x = torch.cat([x, x[:, -1:].expand(out, pad)], dim=1)
    x = x.reshape(out, ng, g)
    return x.amin(dim=-1), x.amax(dim=-1)


def grid_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (rounded to its fp16 storage) and zero-point code of a min/max range, GPTQ's grid: the range
    always contains 0; symmetric grids centre on code 2^(bits-1) and have no stored zero point."""
    maxq = 2**bits - 1
    if symmetric:
        amax = torch.maximum(xmax.abs(), xmin.abs())
        return (2 * amax / maxq).clamp(min=1e-8).to(torch.float16), None
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    scale = ((xmax - xmin) / maxq).clamp(min=1e-8).to(torch.float16)
    zero = torch.clamp(torch.round(-xmin / scale.to(torch.float32)), 0, maxq)
    return scale, zero


def to_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Round-to-nearest codes of `x` on the grid (scale/zero broadcast against x), as float."""
    z = float(2 ** (bits - 1)) if zero is None else zero
    return torch.clamp(torch.round(x / scale.to(torch.float32)) + z, 0, 2**bits - 1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient (quantization-aware training, learned grids)."""
    return (x.round() - x).detach() + x


def scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """x in the forward pass, g x's gradient in the backward (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16, as it will be stored, with a straight-through gradient (learned steps and scales)."""
    return x + (x.half().float() - x).detach()


def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    z = float(2 ** (bits - 1)) if zero is None else zero
    return (codes - z) * scale.to(torch.float32)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = False,
                 layer: str = "") -> IntQuantized:
    check_range("bits", bits, 2, 8)
    out, inp = w.shape
    g = resolve_group_size(group_size, inp, layer)
    x = w.detach().to(torch.float32)
    scale, zero = grid_params(*group_minmax(x, g), bits, symmetric)
    s = expand_groups(scale, g, inp)
    z = None if zero is None else expand_groups(zero, g, inp)
    codes = to_codes(x, s, z, bits)
    return IntQuantized(codes.to(torch.uint8), scale, None if zero is None else zero.to(torch.uint8), bits, g,
                        symmetric)


def stored_bias(module) -> dict[str, torch.Tensor]:
    """A linear's bias as the artifact stores it (fp16), or nothing if it has none."""
    return {} if module.bias is None else {"bias": module.bias.detach().to(torch.float16)}


def restore_bias(module, stored: dict[str, torch.Tensor]) -> None:
    """Copy a stored fp16 bias (see `stored_int_layer`) back into a linear."""
    if "bias" in stored:
        module.bias.data.copy_(stored["bias"].float())


def stored_int_layer(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                     bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The tensors an integer-quantized linear stores: packed codes, fp16 scales, packed zero points, bias."""
    out = {"qweight": pack_bits(codes, bits), "scale": scale}
    if zero is not None:
        out["qzero"] = pack_bits(zero, bits)
    if bias is not None:
        out["bias"] = bias.detach().to(torch.float16)
    return out


def load_int_layer(stored: dict[str, torch.Tensor], bits: int, shape: tuple[int, int]
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes (uint8, `shape`) and zero points (or None) back from `stored_int_layer`'s tensors."""
    codes = unpack_bits(stored["qweight"], bits, shape[0] * shape[1], shape)
    zero = None
    if "qzero" in stored:
        zero = unpack_bits(stored["qzero"], bits, stored["scale"].numel(), stored["scale"].shape)
    return codes, zero
