"""The block-wise Hessian machinery of the OBS/GPTQ family (Frantar et al., GPTQ, ICLR 2023; reference
IST-DASLab/gptq), shared by gptq, sparsegpt, wanda, billm, pbllm and baq.

Per decoder block, on the calibration windows (through the adapter's block-by-block runner, so only one block's
activations are held): H = 2/n * sum X X^T for every linear of the block from the same block input
(`HessianAccumulator`, `block_hessians`), the calibration schedule that hands each linear its H and then runs the
compressed block to produce the next block's input (`quantize_blockwise`), the dampened upper Cholesky factor of
H^-1 (`inverse_hessian_factor`), and GPTQ's column sweep with lazy batch updates (`gptq_sweep`), into which each
method plugs its own per-column rule (a grid, a pruning mask, a binarization).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from bench.errors import NumericalFailure
from bench.precision import fp32
from bench.progress import each_block


class HessianAccumulator:
    """Running H = 2/n * sum_i x_i x_i^T over calibration sequences (the reference's add_batch)."""

    def __init__(self, columns: int):
        self.H = torch.zeros(columns, columns, dtype=torch.float32)
        self.n = 0

    @fp32  # fp32: Hessian accumulation (the hooked input may be bf16 under autocast, e.g. o_proj's, down_proj's)
    def add(self, inp: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).to(torch.float32)
        batch = inp.shape[0] if inp.dim() == 3 else 1
        self.H *= self.n / (self.n + batch)
        self.n += batch
        x = math.sqrt(2 / self.n) * x
        self.H += x.T @ x


@torch.no_grad()
def block_hessians(adapter, inputs, b: int) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run block `b` on the cached inputs: its outputs, and H of every linear of the block by name."""
    refs = [r for r in adapter.linears() if r.block == b]
    acc = {r.name: HessianAccumulator(r.module.weight.shape[1]) for r in refs}
    hooks = [r.module.register_forward_hook(lambda m, a, o, name=r.name: acc[name].add(a[0])) for r in refs]
    try:
        outs = [adapter.run_block(b, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
    finally:
        for hk in hooks:
            hk.remove()
    return outs, {name: a.H for name, a in acc.items()}


@torch.no_grad()
def quantize_blockwise(adapter, windows: torch.Tensor, quantize_layer: Callable[[object, torch.Tensor], None],
                       label: str) -> None:
    """The GPTQ-style calibration schedule: per decoder block, gather every linear's Hessian from the block's
    cached inputs, call `quantize_layer(ref, H)` for each linear (it writes the quantized weight in place),
    then run the quantized block to produce the next block's inputs (as the reference). `label` names the
    method in the per-block progress line."""
    inputs = adapter.capture_block_inputs(list(windows))
    refs = list(adapter.linears())
    for b in each_block(label, len(adapter.blocks())):
        _, hessians = block_hessians(adapter, inputs, b)
        for r in (r for r in refs if r.block == b):
            with fp32():  # fp32: the layer's dampening, Cholesky factors and column sweep
                quantize_layer(r, hessians.pop(r.name))
        inputs.hidden = [adapter.run_block(b, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]


@fp32  # fp32: dampening, Cholesky and cholesky_inverse
def inverse_hessian_factor(H: torch.Tensor, damp: float, layer: str = "") -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, the reference's `Hinv`; its diagonal d_j
    weighs column j's rounding error in GPTQ's loss (w - q)^2 / d_j^2."""
    cols = H.shape[0]
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as e:  # not positive definite even after dampening
        raise NumericalFailure(f"GPTQ Hessian of {layer} is not positive definite ({e})",
                               "raise method.damp or use more calibration samples") from None


def without_dead_columns(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns never activated by the calibration data (diag H = 0): weight zeroed, H made invertible."""
    W, H = W.clone(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


@fp32  # fp32: the column sweep's error feedback (W[:, i:] -= err @ Hinv[i, i:])
def gptq_sweep(W: torch.Tensor, Hinv: torch.Tensor, block_size: int,
               quantize_column: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """GPTQ's column loop with lazy batch updates, in place on W. `quantize_column(c, w, W, W1)` returns the
    quantized column c given its current values w (W holds every update of earlier lazy batches, not those
    of earlier columns of the current batch, as in the reference; W1 is the current lazy batch, columns
    c - c % block_size onwards, with those updates too). Returns the proxy loss."""
    rows, cols = W.shape
    losses = torch.zeros(rows)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantize_column(i1 + i, w, W, W1)
            losses += (w - q) ** 2 / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return float(losses.sum())
