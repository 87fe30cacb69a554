"""`hawq_v3`: HAWQ-V3, "Dyadic Neural Network Quantization" (Yao, Dong, Zheng, Gholami, Yu, Tan, Wang,
Huang, Wang, Mahoney, Keutzer; ICML 2021; reference Zhen-Dong/HAWQ, its ILP script).

Mixed precision by an integer linear program: every layer between the first and the last runs at INT4 or
INT8 (weights per output channel and its input activations alike), chosen to minimise the Hessian-aware
perturbation sum_i Tr(H_i)/n_i * ||W_i - Q_b(W_i)||^2 under a model-size limit
size_4bit + size_limit * (size_8bit - size_4bit) (the reference's `model_size_limit`; 0.5 = an average of
6 bits). Tr(H_i) is the Hutchinson estimate (`hutchinson_iters` Rademacher probes, E[v^T H v]) of the
Hessian of the distillation loss ||f(x) - f_fp(x)||^2 on the first `hessian_images` of `calib=`, which at
the full-precision weights is the Gauss-Newton matrix (the residual is zero). The first and last layer are
INT8, as in the paper. The ILP is solved exactly (scipy's HiGHS MILP; the reference uses PuLP with GLPK).

Quantizers are the suite's `static_ptq` ones (per-channel symmetric weights with an MSE clip search, one
calibrated static range per layer input). HAWQ-V3 deploys integer-only: every requantization multiplier
S_w S_in / S_out is a dyadic number b / 2^c. That rounding (relative error below 2^-31 with 32-bit b) is
far below the fake-quant resolution and is not simulated; no integer kernel runs here (execution:
fake-quant) and the record says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from bench.compress.static_ptq import CALIB_BATCH, StaticPTQBase, quantize_weight
from bench.errors import ConfigError, check_range
from bench.precision import fp32
from bench.quant.integer import weight_matrix

BIT_CHOICES = (4, 8)


@fp32  # fp32: the Hessian-trace estimate, its forwards and double backward included (a second-order measurement)
def hutchinson_traces(model, refs, images: torch.Tensor, iters: int, seed: int) -> dict[str, float]:
    """Per-layer mean Hessian diagonal (trace / #weights) of ||f(x) - f_fp(x)||^2 / N at the current weights."""
    weights = [r.module.weight for r in refs]
    was = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    sums = [0.0] * len(refs)
    try:
        with torch.no_grad():
            targets = [model(images[i:i + CALIB_BATCH]) for i in range(0, images.shape[0], CALIB_BATCH)]
        for _ in range(iters):
            vs = [torch.randint(0, 2, w.shape, generator=g).float() * 2 - 1 for w in weights]
            for k, i in enumerate(range(0, images.shape[0], CALIB_BATCH)):
                loss = (model(images[i:i + CALIB_BATCH]) - targets[k]).pow(2).sum() / images.shape[0]
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                hv = torch.autograd.grad(sum((gr * v).sum() for gr, v in zip(grads, vs)), weights)
                for j, (h, v) in enumerate(zip(hv, vs)):
                    sums[j] += float((h * v).sum())
    finally:
        for w, r in zip(weights, was):
            w.requires_grad_(r)
    return {r.name: sums[j] / iters / r.module.weight.numel() for j, r in enumerate(refs)}


def solve_bits(sensitivity: dict[int, np.ndarray], sizes: np.ndarray, size_limit: float) -> np.ndarray:
    """Exact ILP: choose 4 or 8 bits per layer minimising the summed sensitivity under the size limit."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = len(sizes)
    low, high = BIT_CHOICES
    # x_i = 1 -> 8 bits; cost and size are affine in x
    cost = sensitivity[high] - sensitivity[low]
    budget = sizes.sum() * low + size_limit * sizes.sum() * (high - low)
    cons = LinearConstraint((sizes * (high - low))[None, :], -np.inf, budget - sizes.sum() * low)
    res = milp(cost, constraints=[cons], integrality=np.ones(n), bounds=Bounds(0, 1))
    if not res.success:
        raise ConfigError(f"HAWQ-V3's ILP found no bit assignment ({res.message})", "raise method.size_limit")
    return np.where(np.round(res.x) > 0, high, low)


@dataclass
class HAWQV3(StaticPTQBase):
    name: str = "hawq_v3"
    size_limit: float = 0.5  # 0 = all INT4, 1 = all INT8; 0.5 = an average of 6 bits
    hutchinson_iters: int = 16
    hessian_images: int = 32  # the first calibration images, for the trace estimate (the reference: one batch)
    seed: int = 0
    keep_first_last: bool = False  # first and last layer run INT8 (the paper), not full precision
    paper: ClassVar[str] = "Yao et al., HAWQ-V3: Dyadic Neural Network Quantization (ICML 2021)"

    def __post_init__(self):
        check_range("method.size_limit", self.size_limit, 0.0, 1.0)
        check_range("method.hutchinson_iters", self.hutchinson_iters, 1, 10_000)
        check_range("method.hessian_images", self.hessian_images, 1, 1 << 20)
        if (self.w_bits, self.a_bits) != (8, 8):  # inherited from static_ptq, where they set the uniform bits
            raise ConfigError(f"method.w_bits/a_bits ({self.w_bits}/{self.a_bits}) do not apply to hawq_v3: its ILP "
                              "picks INT4 or INT8 per layer", "set method.size_limit (0 = all INT4, 1 = all INT8)")

    def layer_bits(self, model, refs, calib) -> dict[str, tuple[int, int]]:
        inner = refs[1:-1]  # the ILP's layers; the first and last are INT8
        images = calib.windows[:self.hessian_images] * (model.info["input_range"] / 255.0)
        self._traces = hutchinson_traces(model.module, inner, images, self.hutchinson_iters, self.seed)
        sens = {b: np.array([self._traces[r.name] * float((quantize_weight(weight_matrix(r.module).float(), b)
                                                          .dequantize() - weight_matrix(r.module)).pow(2).sum())
                             for r in inner]) for b in BIT_CHOICES}
        chosen = solve_bits(sens, np.array([r.module.weight.numel() for r in inner], dtype=float), self.size_limit)
        bits = {r.name: (int(b), int(b)) for r, b in zip(inner, chosen)}
        bits.update({refs[0].name: (8, 8), refs[-1].name: (8, 8)})
        return bits

    def compress(self, model, calib, budget):
        packed = super().compress(model, calib, budget)
        for row in packed.per_layer:  # the sensitivity each choice was made on, for the record
            row["hessian_trace_per_weight"] = self._traces.get(row["layer"])
        return packed
