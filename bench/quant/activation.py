"""Activation quantization on the inputs of the adapter's linear layers, so W8A8, W4A8, W4A4, W4-FP4A4 ...
are configs, not code.

Dynamic and symmetric, as SmoothQuant's fake-quant reference does it: the scale is the absmax of each
token's input vector (`per_token`; for a conv, each pixel's channel vector) or of the whole input tensor
(`per_tensor`), computed on the fly. Values go to signed integers (`bits`) or to a low-bit float format
(`format_name`, e.g. fp4_e2m1, fp8_e4m3). Applied as a forward pre-hook on each block linear: the stored weights
are untouched, execution is fake-quant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.errors import ConfigError, check_range
from bench.layer_format import ActFormat
from bench.quant.floating import float_format, round_to_format

GRANULARITIES = ("per_token", "per_tensor")


@dataclass(frozen=True)
class ActQuantSpec:
    bits: int | None = None  # None: activations stay in fp32
    granularity: str = "per_token"
    format_name: str | None = None  # a float format (bench.quant.floating) instead of integers; bits follow it

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"activation granularity '{self.granularity}' is unknown",
                              f"use one of: {', '.join(GRANULARITIES)}")
        if self.format_name is not None:
            float_format(self.format_name)
        elif self.bits is not None:
            check_range("method.act_bits", self.bits, 2, 16)

    @property
    def enabled(self) -> bool:
        return self.bits is not None or self.format_name is not None

    @property
    def tag(self) -> str:
        return self.format.label if self.enabled else "a16"

    @property
    def format(self) -> ActFormat:
        """The layer format's activation part (enabled specs only)."""
        if self.format_name:
            bits = float_format(self.format_name).bits
            return ActFormat(bits, "float", self.granularity, "dynamic", self.format_name)
        return ActFormat(self.bits, "int", self.granularity, "dynamic")


def fake_quant_activations(x: torch.Tensor, spec: ActQuantSpec) -> torch.Tensor:
    xf = x.to(torch.float32)
    token_dim = 1 if x.dim() == 4 else -1  # a conv input (N, C, H, W): a pixel's channel vector is its token
    amax = xf.abs().amax(dim=token_dim, keepdim=True) if spec.granularity == "per_token" else xf.abs().amax()
    if spec.format_name is not None:
        fmt = float_format(spec.format_name)
        scale = (amax / fmt.max_value).clamp(min=1e-8)
        q, _ = round_to_format(xf / scale, fmt)
        return (q.to(torch.float32) * scale).to(x.dtype)
    qmax = 2 ** (spec.bits - 1) - 1
    scale = (amax / qmax).clamp(min=1e-8)
    return (torch.clamp(torch.round(xf / scale), -qmax - 1, qmax) * scale).to(x.dtype)


def fake_quant_blocks(x: torch.Tensor, bits: int, block_size: int, unsigned: bool = False) -> torch.Tensor:
    """Dynamic integer fake-quant of `x` in blocks of `block_size` consecutive elements of its last dimension (the
    last block shorter when the size does not divide it; one block when the dimension is shorter), each block with
    its own absmax scale, fp32, computed on the fly: signed symmetric codes in [-(2^(bits-1) - 1), 2^(bits-1) - 1]
    (2^bits - 1 levels), or, `unsigned` (a non-negative input such as softmax probabilities, negatives clamped to
    0), codes in [0, 2^bits - 1]. Rounded in fp32, returned in x's dtype."""
    xf = x.to(torch.float32)
    n = xf.shape[-1]
    pad = (-n) % block_size if n > block_size else 0
    blocks = torch.nn.functional.pad(xf, (0, pad)) if pad else xf  # zeros leave every block's absmax unchanged
    blocks = blocks.reshape(*xf.shape[:-1], -1, min(block_size, n))
    qmax = 2**bits - 1 if unsigned else 2 ** (bits - 1) - 1
    scale = (blocks.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=1e-8)
    q = torch.clamp(torch.round(blocks / scale), 0 if unsigned else -qmax, qmax) * scale
    return q.reshape(*xf.shape[:-1], -1)[..., :n].to(x.dtype)


def channel_absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """max |x| over every dimension but `dim` (fp32): the range a static per-channel (or per-head) observer
    keeps; fold calls over batches with torch.maximum."""
    x = x.detach().to(torch.float32).abs().movedim(dim, -1)
    return x.reshape(-1, x.shape[-1]).amax(dim=0)


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """The min-max symmetric scale of a `bits`-bit signed grid, absmax / ((2^bits - 1) / 2) (FQ-ViT's MinMax
    observer, which Agile-Quant uses), rounded to its fp16 storage."""
    return (absmax / ((2**bits - 1) / 2)).clamp(min=torch.finfo(torch.float32).eps).to(torch.float16)


def fake_quant_channels(x: torch.Tensor, scale: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Static symmetric fake quantization with one stored scale per index of `dim` (per channel or per head):
    round(x / s) clamped to [-2^(bits-1), 2^(bits-1) - 1], times s."""
    shape = [1] * x.dim()
    shape[dim] = -1
    s = scale.to(torch.float32).reshape(shape)
    q = torch.clamp(torch.round(x.to(torch.float32) / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * s).to(x.dtype)


def fake_quant_log2(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Log2 quantization of probabilities in [0, 1] (FQ-ViT's, as Agile-Quant quantizes the softmax): code
    c = round(-log2 p) clamped to [0, 2^bits - 1], value 2^-c; a p whose round(-log2 p) reaches 2^bits (and p = 0)
    becomes 0. So 2^bits powers of two plus zero."""
    c = torch.round(-torch.log2(p.to(torch.float32)))
    out = torch.pow(2.0, -torch.clamp(c, 0, 2**bits - 1))
    return out.masked_fill(c >= 2**bits, 0.0).to(p.dtype)


def attach(adapter, spec: ActQuantSpec) -> int:
    """Quantize the input of every block linear from now on; returns how many linears were hooked."""
    if not spec.enabled:
        return 0
    n = 0
    for ref in adapter.linears():
        ref.module.register_forward_pre_hook(lambda _m, args: (fake_quant_activations(args[0], spec), *args[1:]))
        n += 1
    return n


@dataclass
class ActivationQuantized:
    """Mixin for weight-quantization methods: `method.act_bits=8` (or `method.act_format=fp4_e2m1`) adds
    dynamic activation quantization to the linears the method compressed."""

    act_bits: int | None = None
    act_format: str | None = None
    act_granularity: str = "per_token"

    @property
    def act_spec(self) -> ActQuantSpec:
        return ActQuantSpec(self.act_bits, self.act_granularity, self.act_format)

    def check_activation_settings(self) -> None:
        ActQuantSpec(self.act_bits, self.act_granularity, self.act_format)  # raises a ConfigError if bad

    def runtime_hooks(self, model, packed):
        spec = self.act_spec
        if attach(model.adapter, spec):
            packed.layer_format = {k: v.with_act(spec.format) for k, v in packed.layer_format.items()}
            packed.info["activations"] = spec.tag
        return packed
