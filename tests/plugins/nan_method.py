"""A test-only plug-in: returns the model with one NaN weight, as a diverged training method would."""

from dataclasses import dataclass

import torch

from bench.packed import EXECUTION_DENSE, Packed
from bench.plugins import Method


@dataclass
class NaNWeights(Method):
    name: str = "nan_weights"

    @torch.no_grad()
    def compress(self, model, calib, budget):
        next(model.adapter.linears()).module.weight[0, 0] = float("nan")
        return Packed(model.module, self.name, EXECUTION_DENSE)
