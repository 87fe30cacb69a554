"""`fp_lowbit`: low-bitwidth floating-point post-training quantization of a diffusion model's weights, after
Chen, Giannoula, Moshovos, "Low-Bitwidth Floating Point Quantization for Efficient High-Quality Diffusion
Models" (arXiv 2408.06995, 2024): FP8/FP6/FP4 weights with a searched format and learned rounding.

Per Conv2d/Linear layer (a conv as its out x in*kh*kw matrix), on calibration inputs X met by the
uncompressed model along its own sampling trajectories from seeded noise (every timestep represented;
`calib=ddpm_noise8`), with H = X^T X the layer-output error of a weight perturbation D is tr(D H D^T):
1. Format search: for every split of `w_bits` - 1 bits into exponent and mantissa (E1..E5; E3M0/E2M1/E1M2
   at 4 bits), each output channel's exponent bias is searched: the bias of an ExMy format is a power-of-two
   rescaling of its range, and with a real-valued bias it is a per-channel fp16 scale s = clip x max|w| /
   max_value, clip from `clip_grid` values in [0.3, 1] (the paper's bias search; the equivalent bias is
   b = b0 - log2 s). Weights rounded to nearest; the split with the least output error wins, per layer.
2. Rounding learning (gradient-free; the paper learns the up/down rounding decision per weight, here with no
   gradients): each weight may take the grid value just below or just above w/s. Starting from
   round-to-nearest, greedy coordinate descent per output channel flips, at each iteration, the single
   weight whose flip lowers tr(D H D^T) the most (the exact change 2 delta (D H)_j + delta^2 H_jj),
   for at most `rounding_iters` x in_features flips, stopping when no flip helps.
Weights always stay on the chosen grid (codes x scale). Activations stay fp32 (weight-only: the paper also
quantizes activations to FP8; not done here). Stored: packed sign/exponent/mantissa codes at `w_bits`
bits, an fp16 scale per output channel, fp16 bias; the format per layer. Execution: fake-quant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError, check_range
from bench.layer_format import LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.precision import fp32
from bench.quant import pack_bits, unpack_bits
from bench.quant.floating import FloatFormat, decode_float, encode_float, round_to_format
from bench.quant.integer import restore_bias, stored_bias, weight_matrix
from bench.sampler import calibration_inputs, layer_inputs


def splits(bits: int) -> list[tuple[int, int]]:
    """(exponent, mantissa) splits of a sign + E + M format of `bits` bits, 1 <= E <= 5."""
    return [(e, bits - 1 - e) for e in range(1, min(5, bits - 1) + 1)]


def grid_neighbours(u: torch.Tensor, fmt: FloatFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values just below and just above each u (equal where u is on the grid or beyond
    the largest value): the two rounding choices of a weight."""
    mags = fmt.magnitudes.to(torch.float32)
    a = u.abs().clamp(max=float(mags[-1]))
    hi_i = torch.searchsorted(mags, a).clamp(max=mags.numel() - 1)
    lo_i = torch.where(mags[hi_i] > a, (hi_i - 1).clamp(min=0), hi_i)
    sign = torch.where(u < 0, -1.0, 1.0)
    return mags[lo_i] * sign, mags[hi_i] * sign


@fp32  # fp32: the layer-output error tr(D H D^T) of the searches
def output_error(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per output channel: d_r H d_r^T (the squared layer-output error on the calibration inputs)."""
    return ((d @ h) * d).sum(dim=1)


@dataclass
class FPLowBit(Method):
    name: str = "fp_lowbit"
    w_bits: int = 4
    clip_grid: int = 15  # clipping ratios (equivalently exponent biases) tried per channel, 1 .. 0.3
    rounding: str = "greedy"  # greedy (gradient-free rounding learning) | nearest
    rounding_iters: float = 1.0  # at most this x in_features flips per channel
    calib_steps: int = 20  # DDIM steps of the calibration trajectories
    calib_rows: int = 4096  # input rows per layer for H
    keep_first_last: bool = False
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = ("Chen, Giannoula, Moshovos, Low-Bitwidth Floating Point Quantization for Efficient "
                            "High-Quality Diffusion Models (arXiv 2408.06995, 2024)")
    applies_to: ClassVar[tuple[str, ...]] = ("diffusion",)
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_range("method.w_bits", self.w_bits, 3, 8)
        check_range("method.clip_grid", self.clip_grid, 1, 1000)
        check_range("method.calib_steps", self.calib_steps, 1, 1000)
        check_range("method.calib_rows", self.calib_rows, 16, 1 << 24)
        if self.rounding not in ("greedy", "nearest"):
            raise ConfigError(f"method.rounding={self.rounding} is unknown", "use greedy or nearest")
        if self.rounding_iters < 0:
            raise ConfigError(f"method.rounding_iters={self.rounding_iters} is negative", "e.g. 1.0")

    def _targets(self, model) -> list:
        refs = list(model.adapter.linears())
        return refs[1:-1] if self.keep_first_last else refs

    # --- step 1: format and per-channel bias ------------------------------------------------------------
    def search_format(self, w: torch.Tensor, h: torch.Tensor) -> tuple[FloatFormat, torch.Tensor, float]:
        amax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
        best = None
        for e, m in splits(self.w_bits):
            fmt = FloatFormat(e, m)
            best_err = torch.full((w.shape[0],), float("inf"))
            best_scale = torch.ones_like(amax)
            for r in torch.linspace(1.0, 0.3, self.clip_grid):
                s = (r * amax / fmt.max_value).to(torch.float16).float().clamp(min=1e-8)
                err = output_error(round_to_format(w / s, fmt)[0] * s - w, h)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better.unsqueeze(1), s, best_scale)
            total = float(best_err.sum())
            if best is None or total < best[2]:
                best = (fmt, best_scale, total)
        return best

    # --- step 2: gradient-free rounding ------------------------------------------------------------------
    @torch.no_grad()
    @fp32  # fp32: the greedy rounding's error terms (D H)
    def learn_rounding(self, w: torch.Tensor, s: torch.Tensor, fmt: FloatFormat, h: torch.Tensor) -> torch.Tensor:
        """Grid values (in units of s) of each weight after greedy flips between its two neighbours."""
        u = w / s
        lo, hi = grid_neighbours(u, fmt)
        cur = round_to_format(u, fmt)[0]
        alt = torch.where(cur == lo, hi, lo)
        if self.rounding == "nearest":
            return cur
        d = (cur - u) * s  # weight error
        g = d @ h  # (out, in): gradient-like term of tr(D H D^T)/2
        diag = torch.diagonal(h)
        rows = torch.arange(w.shape[0])
        active = torch.ones(w.shape[0], dtype=torch.bool)
        for _ in range(int(self.rounding_iters * w.shape[1])):
            delta = (alt - cur) * s
            gain = 2 * delta * g + delta * delta * diag  # change of the row's error if weight j flips
            best, j = gain.min(dim=1)
            active &= best < -1e-12 * (1 + output_error(d, h).abs())
            if not bool(active.any()):
                break
            r, jj = rows[active], j[active]
            dj = delta[r, jj]
            g[r] += dj.unsqueeze(1) * h[jj]
            d[r, jj] += dj
            c = cur[r, jj].clone()
            cur[r, jj] = alt[r, jj]
            alt[r, jj] = c
        return cur

    # --- compress ---------------------------------------------------------------------------------------
    def compress(self, model, calib, budget) -> Packed:
        packed = Packed(model.module, self.name, self.execution)
        refs = self._targets(model)
        xs, ts = calibration_inputs(model, calib, self.calib_steps)
        inputs = layer_inputs(model.module, refs, xs, ts, self.calib_rows, calib.spec.seed)
        chosen: dict[str, str] = {}
        with torch.no_grad(), fp32():  # fp32: H = X^T X, the format search and the rounding
            for ref in refs:
                w = weight_matrix(ref.module)
                x = inputs[ref.name].float()
                h = (x.T @ x) / x.shape[0]
                w32 = w.float()
                fmt, s, _ = self.search_format(w32, h)
                err_rtn = float(output_error(round_to_format(w32 / s, fmt)[0] * s - w32, h).sum())
                q = self.learn_rounding(w32, s, fmt, h)
                codes, _ = encode_float(q, fmt)
                wq = decode_float(codes, fmt) * s
                err = float(output_error(wq - w32, h).sum())
                stored = {"qweight": pack_bits(codes, fmt.bits), "scale": s.to(torch.float16),
                          **stored_bias(ref.module)}
                packed.per_layer.append({**layer_stats(ref, w32, wq), "format": fmt.name,
                                         "output_err_nearest": err_rtn, "output_err_learned": err,
                                         "bias_equiv_mean": float((fmt.exponent_bias - torch.log2(s)).mean())})
                w.copy_(wq)
                packed.layers[ref.name] = stored
                packed.layer_format[ref.name] = LayerFormat.float_grid(f"fp{fmt.bits}_{fmt.name}", fmt.bits, -1)
                chosen[ref.name] = fmt.name
        gains = [p["output_err_learned"] / max(p["output_err_nearest"], 1e-30) for p in packed.per_layer]
        packed.info["rounding_err_ratio_mean"] = sum(gains) / len(gains)
        packed.info["calib_pairs"] = int(xs.shape[0])
        packed.extra_metadata["formats"] = json.dumps(chosen)
        kept = sorted({r.name for r in model.adapter.linears()} - {r.name for r in refs})
        packed.extra_metadata["kept_full_precision"] = ",".join(kept)
        return packed

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        w = weight_matrix(ref.module)
        fmt_name = json.loads(self._restoring_formats)[ref.name]
        e, m = (int(v) for v in fmt_name[1:].split("m"))
        fmt = FloatFormat(e, m)
        codes = unpack_bits(stored["qweight"], fmt.bits, w.numel(), tuple(w.shape))
        w.copy_(decode_float(codes, fmt) * stored["scale"].float())
        restore_bias(ref.module, stored)

    def restore(self, model, tensors, metadata):
        self._restoring_formats = metadata.get("formats", "{}")
        return super().restore(model, tensors, metadata)
