"""`nupes`: NUPES, "Non-Uniform Post-Training Quantization via Power Exponent Search" (Yvinec, Dapogny, Bailly;
arXiv 2308.05600, 2023), the data-free power-exponent search it builds on from PowerQuant (Yvinec, Dapogny, Cord,
Bailly; "PowerQuant: Automorphism Search for Non-Uniform Quantization", ICLR 2023). Weight-only.

The grid. Weights are mapped by the power automorphism t = sign(w)|w|^a, t is quantized on a uniform `bits`-bit grid,
and each level is mapped back by the inverse power w^ = sign(t^)|t^|^(1/a): levels dense near zero and sparse in the
tails for a < 1 (bell-shaped weights), equally spaced for a = 1. Here the uniform grid over t is the suite's rtn grid
(bench.quant.integer, GPTQ's semantics: per output row and group of `group_size` input columns, min/max with a zero
code, or `symmetric` on the mid code; fp16 scales), so exponent 1 is rtn exactly.

The search. Per layer, the exponent minimises the layer's weight reconstruction error ||W - W^(a)||_F^2, the data-free
criterion of PowerQuant, which shows it locally convex with a unique minimiser: `grid_points` exponents evenly spaced
over [exponent_min, exponent_max] plus a = 1, then `refine_steps` golden-section steps inside the bracket around the
best grid point. Every exponent is rounded to its fp16 storage before it is evaluated, and the smallest error among all
evaluated exponents is kept; a = 1 is always one of them, so the result is never worse on a layer than rtn's grid.

Stored per layer: `bench.quant.integer.stored_int_layer`'s tensors of the grid over t (packed `bits`-bit codes, fp16
scale and packed zero code per group, fp16 bias) and the exponent (one fp16 value), all counted in bits per weight.
Execution: fake-quant. No kernel here runs a power grid: its levels are not equally spaced, so the integer kernels of
cpu_kernels/tflite/fpga_sim refuse it (layer kind `power`); the papers' integer-only inference is not implemented.

Read, through the search tool (corpus pages): the NUPES abstract (arxiv.org/abs/2308.05600 and its paperswithcode,
emergentmind and arxivlens pages) and the opening of PowerQuant's ICLR 2023 text (abstract and introduction) with a
review page. No reference code exists publicly (paperswithcode lists none; find_repos "nupes" and "powerquant",
find_string "PowerQuant" and a code search for the power transform found none), so none was read. The bodies of the
papers (NUPES's exact loss, optimiser, schedule and grid details) were not reachable offline; what is stated above and
below is what those texts say.

Deviations from the paper, each deliberate:
- Data-free only. NUPES's full (data-driven) method goes further: it learns the quantized weights over the whole
  quantized space (not only rounding up or down, as AdaRound-style PTQ does) and learns the exponent itself by gradient
  descent during that calibration ("alleviating all the numerical instabilities", how is not readable here); neither
  is implemented, so no calibration data is used and the exponent comes from the search on the weight error alone.
- The exponent is searched by grid + golden section rather than the paper's optimiser; fp16-rounded and per layer.
- The uniform grid over t is the suite's per-group rtn grid (asymmetric by default, as rtn's), not necessarily the
  papers' own grid (not readable here), so that groups, storage and the exponent-1 case match rtn at equal bits.
- Weights only: activations stay in the compute precision (PowerQuant's integer inference modifies the quantized
  network's activation functions to match the power grid; not done here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.compress.rtn import stored_int_grid
from bench.errors import ConfigError, check_range
from bench.layer_format import LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.precision import fp32
from bench.quant import IntQuantized, quantize_rtn
from bench.quant.integer import restore_bias, stored_int_layer, weight_matrix

EXPONENT_CEILING = 4.0  # beyond it |t|^(1/a) underflows the small levels of a group to zero
_GOLDEN = (math.sqrt(5) - 1) / 2


def stored_exponent(a: float) -> float:
    """The exponent as the artifact stores it (fp16), the value every quantization and reload uses."""
    return float(torch.tensor(a, dtype=torch.float16))


def signed_power(x: torch.Tensor, a: float) -> torch.Tensor:
    """sign(x)|x|^a, the power automorphism (exact identity at a = 1)."""
    return torch.sign(x) * x.abs().pow(a)


@dataclass
class PowerQuantized:
    grid: IntQuantized  # the uniform grid over sign(w)|w|^a: codes, fp16 scales, zero codes
    exponent: float  # fp16-representable

    def levels(self) -> torch.Tensor:
        """(out, n_groups, 2^bits): the weight value each code stands for in each group, sign(l)|l|^(1/a) of the
        uniform level l = (code - zero) * scale."""
        q = self.grid
        codes = torch.arange(2**q.bits, dtype=torch.float32)
        zero = float(2 ** (q.bits - 1)) if q.symmetric else q.zero.to(torch.float32)[..., None]
        return signed_power((codes - zero) * q.scale.to(torch.float32)[..., None], 1.0 / self.exponent)

    def dequantize(self) -> torch.Tensor:
        """Each weight looked up in its group's levels (a lookup, not an elementwise power: vectorized pow rounds
        by position in the tensor, and every weight of a group must take exactly one of its 2^bits values)."""
        q = self.grid
        out_f, in_f = q.codes.shape
        n_levels, table = 2**q.bits, self.levels()
        group = torch.arange(in_f) // q.group_size
        index = (torch.arange(out_f)[:, None] * table.shape[1] + group[None, :]) * n_levels + q.codes.long()
        return table.reshape(-1)[index]


def quantize_power(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, exponent: float,
                   layer: str = "") -> PowerQuantized:
    a = stored_exponent(exponent)
    t = signed_power(w.detach().to(torch.float32), a)
    return PowerQuantized(quantize_rtn(t, bits, group_size, symmetric, layer), a)


@fp32  # fp32: the power transforms and the squared errors the search compares
def search_exponent(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, lo: float, hi: float,
                    grid_points: int, refine_steps: int, layer: str = "") -> tuple[PowerQuantized, dict[float, float]]:
    """The exponent in [lo, hi] (1 included) with the smallest ||W - W^(a)||_F^2, its quantization, and the error of
    every exponent evaluated (fp16 value -> squared error)."""
    x = w.detach().to(torch.float32)
    errors: dict[float, float] = {}

    def error(a: float) -> float:
        a = stored_exponent(a)
        if a not in errors:
            errors[a] = float((quantize_power(x, bits, group_size, symmetric, a, layer).dequantize() - x)
                              .pow(2).sum())
        return errors[a]

    for a in [*torch.linspace(lo, hi, grid_points, dtype=torch.float64).tolist(), 1.0]:
        error(a)
    best = min(errors, key=errors.get)
    step = (hi - lo) / (grid_points - 1)
    left, right = max(lo, best - step), min(hi, best + step)
    for _ in range(refine_steps):  # golden section on the bracket around the best grid point
        m1, m2 = right - _GOLDEN * (right - left), left + _GOLDEN * (right - left)
        if error(m1) <= error(m2):
            right = m2
        else:
            left = m1
    best = min(errors, key=lambda a: (errors[a], abs(a - 1.0)))  # ties keep the exponent nearest the uniform grid
    return quantize_power(x, bits, group_size, symmetric, best, layer), errors


@dataclass
class NUPES(Method):
    name: str = "nupes"
    bits: int = 4
    group_size: int = 128  # -1 = per output channel
    symmetric: bool = False
    exponent_min: float = 0.2
    exponent_max: float = 1.0
    grid_points: int = 17
    refine_steps: int = 10
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = ("Yvinec et al., NUPES: Non-Uniform Post-Training Quantization via Power Exponent Search "
                            "(arXiv 2308.05600, 2023)")
    applies_to: ClassVar[tuple[str, ...]] = ("causal_lm", "image_sr")

    def __post_init__(self):
        check_range("method.bits", self.bits, 2, 8)
        lo, hi = self.exponent_min, self.exponent_max
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))
                and 0 < lo <= 1 <= hi <= EXPONENT_CEILING):
            raise ConfigError(f"exponent range method.exponent_min={lo}, method.exponent_max={hi} is not a range "
                              "around 1", f"use 0 < method.exponent_min <= 1 <= method.exponent_max <= "
                              f"{EXPONENT_CEILING:g} (1, the uniform grid, must stay a candidate)")
        check_range("method.grid_points", self.grid_points, 2, 1000)
        check_range("method.refine_steps", self.refine_steps, 0, 100)

    def layer_format(self) -> LayerFormat:
        return LayerFormat.power_grid(self.bits, self.group_size, self.symmetric, prefix="nupes")

    @torch.no_grad()
    def compress(self, model, calib, budget) -> Packed:
        packed = Packed(model.module, self.name, self.execution)
        exponents = []
        for ref in model.adapter.linears():
            w = weight_matrix(ref.module)
            q, errors = search_exponent(w, self.bits, self.group_size, self.symmetric, self.exponent_min,
                                        self.exponent_max, self.grid_points, self.refine_steps, ref.name)
            wq = q.dequantize()
            packed.per_layer.append({**layer_stats(ref, w, wq), "exponent": q.exponent,
                                     "sq_error": errors[q.exponent], "sq_error_uniform": errors[1.0],
                                     "exponents_evaluated": len(errors)})
            exponents.append(q.exponent)
            w.copy_(wq)
            stored = stored_int_layer(q.grid.codes, q.grid.scale, q.grid.zero, self.bits, ref.module.bias)
            stored["exponent"] = torch.tensor([q.exponent], dtype=torch.float16)
            packed.layers[ref.name] = stored
            packed.layer_format[ref.name] = self.layer_format()
        packed.info.update(exponent_mean=sum(exponents) / len(exponents), exponent_min=min(exponents),
                           exponent_max=max(exponents), uniform_layers=sum(a == 1.0 for a in exponents))
        return packed

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        grid = stored_int_grid(ref, stored, self.bits, self.group_size, self.symmetric)
        weight_matrix(ref.module).copy_(PowerQuantized(grid, float(stored["exponent"])).dequantize())
        restore_bias(ref.module, stored)
