"""`lmul`: L-Mul, linear-complexity multiplication, from Luo & Sun, "Addition is All You Need for Energy-Efficient
Language Models" (arXiv 2410.00907, 2024), emulated bit-exactly in torch in the attention matmuls (Q K^T and
softmax(.) V, the paper's main setting) and optionally in the decoder blocks' linears. It changes how the forward
multiplies, not the stored weights: bits per weight are those of the base model; accuracy is an emulation
(execution `emulated-lmul`), the CPU time is that of the emulation, never of L-Mul hardware.

Written from the paper's definition and its fp32 PTX listing (Figure 2: add the two sign-stripped bit patterns as
integers, subtract the exponent bias minus the offset, 0x3F780000 for fp32, OR in the XOR of the signs), as restated
in public reimplementations read for it (PyRTL `lmul_simple`, a Python `struct` port of the PTX); no code copied,
and no reference code of the authors is public.

The arithmetic. Operands are rounded to `mantissa_bits` = m explicit mantissa bits, round to nearest, ties to even
(`bench.quant.floating.round_mantissa`, exact on the bit pattern), keeping float32's 8-bit exponent. For
x = (1 + xm) 2^xe and y = (1 + ym) 2^ye, with l(m) = m if m <= 3, 3 if m = 4, 4 if m > 4 (the paper's offset):
    L-Mul(x, y) = (-1)^(sx xor sy) (1 + xm + ym + 2^-l(m)) 2^(xe + ye)          if xm + ym + 2^-l(m) < 1,
                = (-1)^(sx xor sy) (1 + (xm + ym + 2^-l(m) - 1)) 2^(xe + ye + 1)  otherwise:
the integer adder's mantissa field overflows into the exponent field (the paper's "automatic carry handling by the
fp bit format"). The first line is the paper's equation; the second is what its adder (and so its PTX) computes when
the mantissa sum reaches 2, which the equation read literally (1 + s with s >= 1, no carry) would not: this module
follows the adder. Note that the offset makes L-Mul inexact even when one operand is a power of two
(L-Mul(1, y) = y (1 + 2^-l / (1 + ym)) when ym + 2^-l < 1); it is exact where xm ym = 2^-l (no carry) or
(1 - xm)(1 - ym) = 2^(1-l) (carry), and it scales exactly by powers of two of either operand. Its relative error to
the exact product of the rounded operands lies in [(c - t^2) / (1 + t)^2, c] with c = 2^-l(m), t = (1 - c) / 2:
the top at xm = ym = 0, the bottom at xm = ym = t, where the two branches meet (-3.2% at m = 3 and 4, -7.3% from
m = 5; Mitchell's -1/9 at c = 0); derived here from the definition above (the paper states the expected error).
Special values: zeros (and float32 subnormals, flushed to zero, FTZ) give a zero product; a NaN or inf operand makes
the dot products it enters NaN (the paper's adder has no special-value logic; an inf would be garbage there); a
product whose exponent leaves float32's range is whatever float32 makes of it (below 2^-126: gradual underflow,
the adder would wrap around). The sign is the XOR of the signs.

The dot product. An L-Mul dot product is a sum of L-Mul products, so no matmul kernel computes it directly.
Emulation: L-Mul(x, y) = sign(x) 2^xe * sign(y) 2^ye * G[i, j], with i, j the operands' mantissa codes and G the
2^m x 2^m table of the mantissa factors above (every entry exact in float32). So
    sum_d L-Mul(a[t, d], b[d, s]) = sum_i A_i @ B_i,
    A_i = sign(a) 2^ae [code(a) = i],  B_i = sign(b) 2^be G[i, code(b)],
one float32 matmul per mantissa class i (2^m of them: 8 at m = 3, 16 at 4, 128 at 7). Every product inside those
matmuls is a power of two times a number of at most m + 3 significant bits, so float32 forms it exactly: the
products are bit-exactly L-Mul's. Accumulation is float32 (the paper accumulates in fp32 too), in the order of
torch's float32 matmul within each class, the class sums then added in float32: a sequential float32 loop would
round differently at the 1e-7 relative level. Memory stays bounded: each class step holds two operand-sized
tensors, never a (T, S, d) tensor of products. Cost: 2^m times the exact matmuls plus elementwise work, computed in
fp32 whatever `precision=` (an fp32 island); `benchmarks/` has no timing of it, the report of the branch gives one
window's wall time.

Where: `apply_to: attention` replaces the two attention matmuls of every block (through the model adapter's
`use_attention`, any architecture it adapts; grouped key/value heads repeated as the model does). The 1/sqrt(d)
scaling (a power of two for head_dim 64), the mask, softmax and the rest of the model stay exact float32, as in the
paper's attention setting. `apply_to: attention+linears` also runs each block linear (the adapter's linears: q, k,
v, o and the MLP's) as L-Mul dot products of its input with its weight, bias added exactly; the embeddings and the
LM head stay exact. Deviations from the paper: (1) operands keep float32's 8-bit exponent at every mantissa width,
so "m = 3" is L-Mul on e8m3 numbers, not on fp8_e4m3 with its 4-bit exponent range (max 448, subnormals), and m = 7
is bf16's format; (2) the paper's experiments also run L-Mul in training and in every multiplication of a model,
here only inference in the chosen matmuls.

Energy: an estimate, never a measurement, labelled `model:horowitz_isscc2014_45nm` (bench.energy.MAC_PJ): an L-Mul
multiply-accumulate = one 32-bit integer add + one fp32 add, against fp32 multiply + add for the exact product (the
paper's energy argument: the multiplier becomes an integer adder). Recorded per MAC, and per token for the
linears when they run L-Mul; the attention's MACs per token grow with the context (2 x heads x head_dim x blocks
per attended key, recorded), so they are left to whoever knows the context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench import energy
from bench.errors import ConfigError
from bench.packed import EXECUTION_EMULATED_PREFIX, Packed
from bench.plugins import Method
from bench.precision import fp32
from bench.quant.floating import round_mantissa

EXECUTION_EMULATED_LMUL = f"{EXECUTION_EMULATED_PREFIX}lmul"  # fp32 matmuls emulate it: L-Mul's accuracy, not its speed
APPLY_TO = ("attention", "attention+linears")
MANTISSA_BITS = (1, 7)  # 2^m matmuls per dot product: beyond 7 (bf16) the emulation is too slow to be useful
_SIGN_AND_EXPONENT = -(1 << 23)  # 0xFF800000 as int32: clears the mantissa field


def offset_exponent(m: int) -> int:
    """The paper's l(m): the offset 2^-l(m) stands in for the mantissa product xm * ym."""
    return m if m <= 3 else (3 if m == 4 else 4)


@lru_cache(maxsize=None)
def mantissa_factors(m: int) -> torch.Tensor:
    """G[i, j]: the mantissa factor of L-Mul for mantissa codes i, j (value 1 + code / 2^m), carry included; the
    product is sign * 2^(xe + ye) * G[i, j]. Exact in float32 (at most m + 3 significant bits)."""
    n = 1 << m
    codes = torch.arange(n, dtype=torch.float64) / n
    s = codes[:, None] + codes[None, :] + 2.0 ** -offset_exponent(m)
    return torch.where(s < 1, 1 + s, 2 * s).to(torch.float32)


def _split(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign * 2^exponent, mantissa code) of x rounded to m mantissa bits; zeros, subnormals (flushed) and
    non-finite values get a zero scale (non-finite ones are poisoned separately)."""
    r = round_mantissa(x, m)
    bits = r.view(torch.int32)
    scale = (bits & _SIGN_AND_EXPONENT).view(torch.float32)  # subnormals have exponent field 0: +-0 here
    scale = torch.where(torch.isfinite(r), scale, torch.zeros((), dtype=torch.float32))
    return scale, (bits >> (23 - m)) & ((1 << m) - 1)


def lmul_matmul(a: torch.Tensor, b: torch.Tensor, m: int) -> torch.Tensor:
    """a (..., T, D) x b (..., D, S) -> (..., T, S) float32, every product an L-Mul at m mantissa bits, summed in
    float32 (see the module docstring): one float32 matmul per mantissa class of a."""
    with fp32():  # an fp32 island under precision=bf16: autocast would round the class operands to bf16
        a, b = a.to(torch.float32), b.to(torch.float32)
        scale_a, code_a = _split(a, m)
        scale_b, code_b = _split(b, m)
        table = mantissa_factors(m)
        zero = torch.zeros((), dtype=torch.float32)
        out = None
        present = torch.bincount(code_a[scale_a != 0].flatten(), minlength=1 << m)
        for i in torch.nonzero(present).flatten().tolist():
            part = torch.where(code_a == i, scale_a, zero) @ (scale_b * table[i][code_b])
            out = part if out is None else out.add_(part)
        if out is None:  # every a is zero
            out = torch.zeros(torch.broadcast_shapes(a.shape[:-1], b.shape[:-2]) + (a.shape[-2], b.shape[-1]))
        bad_a, bad_b = ~torch.isfinite(a).all(dim=-1), ~torch.isfinite(b).all(dim=-2)
        if bad_a.any() or bad_b.any():
            out = out.masked_fill(bad_a.unsqueeze(-1) | bad_b.unsqueeze(-2), float("nan"))
        return out


def lmul_attention(m: int):
    """An attention function (the adapter's `use_attention` signature) whose two matmuls are L-Mul dot products."""

    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        dtype = query.dtype
        groups = query.shape[1] // key.shape[1]  # grouped-query attention: each kv head serves `groups` heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        with fp32():
            scores = lmul_matmul(query, key.transpose(2, 3), m) * scaling
            if attention_mask is not None:
                scores = scores + attention_mask[:, :, :, :key.shape[-2]].to(torch.float32)
            probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=module.training)
            out = lmul_matmul(probs, value, m)
        return out.transpose(1, 2).contiguous().to(dtype), probs.to(dtype)

    return attend


class LMulLinear(nn.Linear):
    """A linear whose products are L-Mul at `mantissa_bits`, bias added exactly; same parameters (and state-dict
    keys) as the linear it replaces."""

    mantissa_bits: int = 3

    @classmethod
    def replacing(cls, linear: nn.Linear, mantissa_bits: int) -> "LMulLinear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.mantissa_bits = mantissa_bits
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = lmul_matmul(flat, self.weight.t(), self.mantissa_bits)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


@dataclass
class LMul(Method):
    name: str = "lmul"
    mantissa_bits: int = 3  # the paper's widths: 3 (fp8_e4m3's), 4, 7 (bf16's)
    apply_to: str = "attention"  # attention | attention+linears
    family: ClassVar[str] = "approximate-multiplication"
    paper: ClassVar[str] = ("Luo & Sun, Addition is All You Need for Energy-Efficient Language Models "
                            "(arXiv 2410.00907, 2024): L-Mul")
    execution: ClassVar[str] = EXECUTION_EMULATED_LMUL

    def __post_init__(self):
        lo, hi = MANTISSA_BITS
        if isinstance(self.mantissa_bits, bool) or not isinstance(self.mantissa_bits, int) \
                or not lo <= self.mantissa_bits <= hi:
            raise ConfigError(f"method.mantissa_bits={self.mantissa_bits} is not an L-Mul mantissa width here",
                              f"use an integer in [{lo}, {hi}], e.g. 3 (fp8_e4m3's), 4 or 7 (bf16's)")
        if self.apply_to not in APPLY_TO:
            raise ConfigError(f"method.apply_to='{self.apply_to}' is unknown", f"use one of: {', '.join(APPLY_TO)}")

    def compress(self, model, calib, budget) -> Packed:
        self.check_applicable(model)
        return self.runtime_hooks(model, Packed(model.module, self.name, self.execution))

    def runtime_hooks(self, model, packed):
        """L-Mul attention (and linears) on the model, after compress and after restore alike: nothing is stored."""
        adapter, m = model.adapter, self.mantissa_bits
        adapter.use_attention(f"lmul_m{m}", lmul_attention(m))
        linears = self.apply_to == "attention+linears"
        if linears:
            for ref in list(adapter.linears()):
                adapter.replace_linear(ref, LMulLinear.replacing(ref.module, m))
        config = model.module.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        source = f"model:{energy.HOROWITZ_TABLE}"
        packed.info.update({
            "mantissa_bits": m, "offset_exponent": offset_exponent(m), "mantissa_classes": 1 << m,
            "attention_macs_per_token_per_attended_key": 2 * config.num_attention_heads * head_dim
            * len(adapter.blocks()),
            energy.metric_name("lmul_mac_pj", source): energy.MAC_PJ["lmul"],
            energy.metric_name("fp32_mac_pj", source): energy.MAC_PJ["fp32"]})
        if linears:
            macs = model.info["n_block_linear_weights"]
            packed.info[energy.metric_name("linears_lmul_j_per_token", source)] = macs * energy.MAC_PJ["lmul"] * 1e-12
            packed.info[energy.metric_name("linears_fp32_j_per_token", source)] = macs * energy.MAC_PJ["fp32"] * 1e-12
        packed.info["arithmetic"] = (f"L-Mul m={m} (e8m{m} operands, RNE), fp32 accumulation, emulated in "
                                     f"{self.apply_to}")
        packed.extra_metadata["lmul"] = f"m={m};apply_to={self.apply_to}"
        return packed
