"""`magnitude`: magnitude pruning, the baseline of every LLM pruning paper (e.g. Wanda's and SparseGPT's
tables): keep the weights with the largest |w|, compared over the whole layer (unstructured) or within each
group of M inputs of a row (N:M). No calibration, no weight update. Stored sparse (see bench.compress.sparsity)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.compress.sparsity import Pruning, keep_top


@dataclass
class MagnitudePruning(Pruning):
    name: str = "magnitude"
    paper: ClassVar[str] = "Magnitude pruning (Han et al., 2015), as the baseline of Wanda and SparseGPT"

    @torch.no_grad()
    def compress(self, model, calib, budget):
        packed = self.new_packed(model)
        for ref in model.adapter.linears():
            w = ref.module.weight.data.clone()
            self.store(packed, ref, w, w, keep_top(w.abs(), self.spec, per_row=False))
        return packed
