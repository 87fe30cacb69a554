"""`sparsegpt`: SparseGPT, "Massive Language Models Can Be Accurately Pruned in One-Shot" (Frantar, Alistarh;
ICML 2023; reference IST-DASLab/sparsegpt). OBS-based pruning with weight reconstruction.

GPTQ's column sweep (lazy batches of `block_size`, dampening `damp`, Cholesky factor of H^-1) where each
column's "quantization" sets its pruned weights to zero and the error is spread over the columns not yet
processed. Mask selection as the reference: unstructured, at the start of every batch of `block_size`
columns the weights with the smallest w^2 / d_j^2 over the whole batch are pruned (d = diagonal of the
factor); N:M, at every M-th column the N kept of each row's M are those with the largest w^2 / d_j^2,
with the earlier columns' updates applied. Calibration block by block through the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.compress.hessian import gptq_sweep, inverse_hessian_factor, quantize_blockwise, without_dead_columns
from bench.compress.sparsity import Pattern, Pruning, keep_top
from bench.errors import ConfigError, check_range
from bench.precision import fp32


@fp32  # fp32: Hessian factor, mask scores and the column sweep's error feedback
def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, pattern: Pattern, damp: float = 0.01,
                    block_size: int = 128, layer: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    W, H = without_dead_columns(weight.detach().to(torch.float32), H)
    rows, cols = W.shape
    Hinv = inverse_hessian_factor(H, damp, layer)
    d = torch.diag(Hinv)
    kept = torch.ones(rows, cols, dtype=torch.bool)
    out = torch.zeros(rows, cols)

    def prune_column(c, w, _W, W1):
        i = c % block_size
        if not pattern.structured and i == 0:
            kept[:, c:c + W1.shape[1]] = keep_top(W1.pow(2) / d[c:c + W1.shape[1]].pow(2), pattern, per_row=False)
        if pattern.structured and c % pattern.m == 0:
            kept[:, c:c + pattern.m] = keep_top(W1[:, i:i + pattern.m].pow(2) / d[c:c + pattern.m].pow(2), pattern)
        out[:, c] = torch.where(kept[:, c], w, torch.zeros(()))
        return out[:, c]

    gptq_sweep(W, Hinv, block_size, prune_column)
    return out, kept


@dataclass
class SparseGPT(Pruning):
    name: str = "sparsegpt"
    damp: float = 0.01
    block_size: int = 128
    paper: ClassVar[str] = "Frantar & Alistarh, SparseGPT: Massive LMs Can Be Accurately Pruned in One-Shot (ICML 2023)"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        check_range("method.damp", self.damp, 1e-6, 1.0)
        if self.spec.structured and self.block_size % self.spec.m:
            raise ConfigError(f"method.block_size={self.block_size} is not a multiple of M in {self.pattern}",
                              "use a block size that M divides, e.g. 128")

    @torch.no_grad()
    def compress(self, model, calib, budget):
        packed = self.new_packed(model)
        spec = self.spec

        def prune_layer(ref, H):
            w = ref.module.weight.data.clone()
            pruned, kept = sparsegpt_prune(w, H, spec, self.damp, self.block_size, ref.name)
            self.store(packed, ref, w, pruned, kept)

        quantize_blockwise(model.adapter, calib.windows, prune_layer, self.name)
        return packed
