"""`wanda`: Wanda, "A Simple and Effective Pruning Approach for Large Language Models" (Sun, Liu, Bair, Kolter;
ICLR 2024; reference locuslab/wanda). Score |W_ij| * ||X_j||_2, the weight times the norm of its input
feature over the calibration tokens; keep the highest scores per output row (unstructured) or per group of
M inputs of a row (N:M). No weight update. Calibration block by block through the adapter, each block's
inputs coming from the already-pruned blocks before it (as the reference). ||X_j||_2 is read from the
diagonal of the block's input second-moment matrix (the same accumulation GPTQ uses; only its diagonal is
needed, and it orders the weights of a row exactly as the reference's running norm does)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.compress.hessian import quantize_blockwise
from bench.compress.sparsity import Pruning, keep_top


@dataclass
class Wanda(Pruning):
    name: str = "wanda"
    paper: ClassVar[str] = "Sun et al., Wanda: A Simple and Effective Pruning Approach for LLMs (ICLR 2024)"
    needs_calibration: ClassVar[bool] = True

    @torch.no_grad()
    def compress(self, model, calib, budget):
        packed = self.new_packed(model)

        def prune_layer(ref, H):
            w = ref.module.weight.data.clone()
            score = w.abs() * torch.diag(H).clamp(min=0).sqrt()[None, :]
            self.store(packed, ref, w, w, keep_top(score, self.spec, per_row=True))

        quantize_blockwise(model.adapter, calib.windows, prune_layer, self.name)
        return packed
