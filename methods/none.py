"""`none`: the uncompressed baseline (base weights at the model's storage dtype, dense execution)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bench.packed import EXECUTION_DENSE, Packed
from bench.plugins import Method


@dataclass
class NoCompression(Method):
    name: str = "none"
    family: ClassVar[str] = "baseline"
    paper: ClassVar[str] = ""
    applies_to: ClassVar[tuple[str, ...]] = ("causal_lm", "image_sr", "image_classifier", "diffusion")
    execution: ClassVar[str] = EXECUTION_DENSE

    def compress(self, model, calib, budget) -> Packed:
        return Packed(model.module, self.name, EXECUTION_DENSE)
