"""`llm_fp4`: LLM-FP4, "4-Bit Floating-Point Quantized Transformers" (Liu, Oguz, Zhao, Chang, Stock, Mehdad,
Shi, Krishnamoorthi, Chandra; EMNLP 2023). Floating-point weights and activations with a searched format and
exponent bias.

An ExMy format with a real-valued exponent bias b has the largest value (2 - 2^-y) 2^(2^x - 1 - b): moving
b rescales the format by a power of two, so the bias is the clipping range. Per block linear, on inputs
captured block by block from the unquantized model (as the reference, nbasyl/LLM-FP4):
1. Weights, one bias per output channel, initialised so that the largest value is the row's max |w|. For
   every format splitting `w_bits` - 1 bits into exponent and mantissa (E3M0, E2M1, E1M2 at 4 bits; at most
   5 exponent bits), search each row's bias among (alpha + i (beta - alpha) / grid) x its initial bias,
   i = 0..grid, minimising the row's output MSE (inputs quantized with the current activation parameters);
   then keep the format with the smallest output MSE.
2. Activations (if `a_bits`): static, per tensor, with the paper's pre-shifted exponent bias. Each input
   channel c gets an initial bias b_c from its calibration max; the tensor bias t is searched on the same
   grid x min_c b_c, and channel c uses t + k_c with the integer k_c = clamp(round(b_c), round(t),
   round(t) + 2^x - 1) - round(t). The k_c are powers of two that fold exactly into the weight's input
   columns, so the hardware sees one per-tensor FP format. Then the activation format is chosen like the
   weights'.
3. Steps 1-2 alternate `search_rounds` times (reference: 3).

Searches use `search_tokens` calibration tokens per layer (evenly spaced). Stored per layer: packed
sign+exponent+mantissa codes, an fp16 scale 2^(b0 - b) per row (b0 the format's integer default bias), the
format; with activations, t (fp32), the shifts k_c (uint8) and the activation format. Execution:
fake-quant. As for every method here, W/A bits apply to the block linears; the reference also quantizes
the attention matmuls and embeddings, which this implementation leaves in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError, check_range
from bench.layer_format import ActFormat, LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.precision import fp32
from bench.progress import each_block
from bench.quant import pack_bits, unpack_bits
from bench.quant.floating import FloatFormat, decode_float, encode_float, fake_quant_float_bias
from bench.quant.integer import restore_bias, stored_bias


def formats_for(bits: int) -> list[tuple[int, int]]:
    """(exponent, mantissa) splits of a `bits`-bit sign+E+M format with 1..5 exponent bits."""
    return [(bits - 1 - m, m) for m in range(bits - 1) if 1 <= bits - 1 - m <= 5]


def start_format(bits: int) -> tuple[int, int]:
    """The format before the search chooses: E2M1 at 4 bits, E4M3 at 8 (the reference's defaults)."""
    return {4: (2, 1), 8: (4, 3)}.get(bits, formats_for(bits)[len(formats_for(bits)) // 2])


def initial_bias(maxval: torch.Tensor, e: int, m: int) -> torch.Tensor:
    """The bias whose largest representable value is `maxval`."""
    return 2**e - torch.log2(maxval.clamp(min=1e-8)) + math.log2(2 - 2.0**-m) - 1


def default_bias(e: int) -> int:
    return 2 ** (e - 1) - 1


def act_shifts(channel_bias: torch.Tensor, t: torch.Tensor, e: int) -> torch.Tensor:
    """The pre-shifted integer exponent offsets k_c in [0, 2^e - 1] of each input channel."""
    rt = torch.round(t)
    return torch.clamp(torch.round(channel_bias), rt, rt + 2**e - 1) - rt


@dataclass
class ActParams:
    e: int
    m: int
    t: torch.Tensor  # scalar tensor bias
    shift: torch.Tensor  # (in,) integer offsets

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_float_bias(x.to(torch.float32), self.e, self.m, self.t + self.shift).to(x.dtype)


@dataclass
class LLMFP4(Method):
    name: str = "llm_fp4"
    w_bits: int = 4
    a_bits: int | None = 4  # null: weight-only
    grid: int = 100  # candidates per bias search (reference eq_n)
    alpha: float = 0.01  # candidate range, as fractions of the initial bias (reference eq_alpha, eq_beta)
    beta: float = 1.2
    search_rounds: int = 1  # reference: 3
    search_tokens: int = 512  # reference: every calibration token
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = "Liu et al., LLM-FP4: 4-Bit Floating-Point Quantized Transformers (EMNLP 2023)"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_range("method.w_bits", self.w_bits, 3, 8)
        if self.a_bits is not None:
            check_range("method.a_bits", self.a_bits, 3, 8)
        check_range("method.grid", self.grid, 1, 10_000)
        check_range("method.search_rounds", self.search_rounds, 1, 100)
        check_range("method.search_tokens", self.search_tokens, 1, 1 << 24)
        if not 0 < self.alpha < self.beta:
            raise ConfigError(f"method.alpha={self.alpha}, method.beta={self.beta}: need 0 < alpha < beta",
                              "e.g. method.alpha=0.01 method.beta=1.2 (the reference's range)")

    # --- search ------------------------------------------------------------------------------------------
    def _factors(self) -> torch.Tensor:
        return self.alpha + torch.arange(self.grid + 1, dtype=torch.float32) * (self.beta - self.alpha) / self.grid

    def _search_weight_bias(self, w, x_q, y_ref, e, m, bias0):
        best_err = torch.full((w.shape[0],), float("inf"))
        best = bias0.clone()
        for f in self._factors():
            b = f * bias0
            err = (x_q @ fake_quant_float_bias(w, e, m, b.unsqueeze(1)).T - y_ref).pow(2).mean(dim=0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, b, best)
        return best

    def _search_act_bias(self, x, wq, y_ref, e, m, channel_bias):
        t0 = channel_bias.min()
        best_err, best = float("inf"), t0
        for f in self._factors():
            t = f * t0
            xq = fake_quant_float_bias(x, e, m, t + act_shifts(channel_bias, t, e))
            err = float((xq @ wq.T - y_ref).pow(2).mean())
            if err < best_err:
                best_err, best = err, t
        return best

    @torch.no_grad()
    @fp32  # fp32: the format/bias searches and their output errors (x @ w^T)
    def search_layer(self, w: torch.Tensor, x: torch.Tensor) -> tuple[tuple[int, int], torch.Tensor, ActParams | None]:
        """w (out, in), x (tokens, in) -> (weight format, per-row bias, activation parameters)."""
        y_ref = x @ w.T
        w_formats = formats_for(self.w_bits)
        w_bias = {f: initial_bias(w.abs().amax(dim=1), *f) for f in w_formats}
        w_fmt = start_format(self.w_bits)
        act = None
        if self.a_bits is not None:
            a_formats = formats_for(self.a_bits)
            ch_max = x.abs().amax(dim=0)
            ch_bias = {f: initial_bias(ch_max, *f) for f in a_formats}
            t = {f: ch_bias[f].min() for f in a_formats}
            a_fmt = start_format(self.a_bits)

            def act_of(f):
                return ActParams(*f, t[f], act_shifts(ch_bias[f], t[f], f[0]))
            act = act_of(a_fmt)

        def wq_of(f):
            return fake_quant_float_bias(w, *f, w_bias[f].unsqueeze(1))

        for _ in range(self.search_rounds):
            x_q = act.quantize(x) if act else x
            for f in w_formats:
                w_bias[f] = self._search_weight_bias(w, x_q, y_ref, *f, w_bias[f])
            w_fmt = min(w_formats, key=lambda f: float((x_q @ wq_of(f).T - y_ref).pow(2).mean()))
            if act is None:
                continue
            wq = wq_of(w_fmt)
            for f in a_formats:
                t[f] = self._search_act_bias(x, wq, y_ref, *f, ch_bias[f])
            act = min((act_of(f) for f in a_formats),
                      key=lambda a: float((a.quantize(x) @ wq.T - y_ref).pow(2).mean()))
        return w_fmt, w_bias[w_fmt], act

    # --- compress / store --------------------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, model, calib, budget) -> Packed:
        adapter = model.adapter
        packed = Packed(model.module, self.name, self.execution)
        inputs = adapter.capture_block_inputs(list(calib.windows))
        for b in each_block(self.name, len(adapter.blocks())):
            outs, feats = adapter.run_block_capturing(b, inputs)
            for ref in (r for r in adapter.linears() if r.block == b):
                x = feats[ref.role].reshape(-1, feats[ref.role].shape[-1]).to(torch.float32)
                x = x[:: max(1, x.shape[0] // self.search_tokens)][: self.search_tokens]
                w = ref.module.weight.data
                (e, m), bias, act = self.search_layer(w.to(torch.float32), x)
                fmt = FloatFormat(e, m)
                scale = torch.pow(2.0, default_bias(e) - bias).clamp(min=6e-8, max=6e4).to(torch.float16)
                codes, q = encode_float(w.to(torch.float32) / scale.to(torch.float32).unsqueeze(1), fmt)
                wq = q * scale.to(torch.float32).unsqueeze(1)
                stored = {"qweight": pack_bits(codes, self.w_bits), "scale": scale.unsqueeze(1),
                          "w_format": torch.tensor([e, m], dtype=torch.uint8)}
                stored.update(stored_bias(ref.module))
                label = LayerFormat.float_grid(f"fp{self.w_bits}-e{e}m{m}", self.w_bits, -1)
                if act is not None:
                    stored.update(act_bias=act.t.reshape(1).to(torch.float32), act_shift=act.shift.to(torch.uint8),
                                  act_format=torch.tensor([act.e, act.m], dtype=torch.uint8))
                    label = label.with_act(ActFormat(self.a_bits, "float", "per_tensor", "static",
                                                     f"fp{self.a_bits}-e{act.e}m{act.m}", ("preshifted",)))
                packed.per_layer.append({**layer_stats(ref, w, wq), "w_format": f"e{e}m{m}",
                                         "a_format": f"e{act.e}m{act.m}" if act else None})
                w.copy_(wq)
                packed.layers[ref.name] = stored
                packed.layer_format[ref.name] = label
            inputs.hidden = outs  # the next block is calibrated on unquantized outputs, like the reference
        formats = [p["w_format"] for p in packed.per_layer]
        packed.info["weight_formats"] = {f: formats.count(f) for f in sorted(set(formats))}
        return self.runtime_hooks(model, packed)

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        out_f, in_f = ref.module.weight.shape
        e, m = (int(v) for v in stored["w_format"])
        codes = unpack_bits(stored["qweight"], self.w_bits, out_f * in_f, (out_f, in_f))
        ref.module.weight.data.copy_(decode_float(codes, FloatFormat(e, m)) * stored["scale"].to(torch.float32))
        restore_bias(ref.module, stored)

    def runtime_hooks(self, model, packed):
        """Static activation quantization from the stored per-layer parameters (after compress or restore)."""
        for ref in model.adapter.linears():
            stored = packed.layers.get(ref.name, {})
            if "act_bias" not in stored:
                continue
            e, m = (int(v) for v in stored["act_format"])
            act = ActParams(e, m, stored["act_bias"].reshape(()), stored["act_shift"].to(torch.float32))
            ref.module.register_forward_pre_hook(lambda _m, args, act=act: (act.quantize(args[0]), *args[1:]))
        if self.a_bits is not None:
            packed.info["activations"] = f"fp{self.a_bits}-per_tensor-static-preshifted"
        return packed
