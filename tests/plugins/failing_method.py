"""A test-only third-party plug-in (found through hydra.searchpath): raises in the middle of compress."""

from dataclasses import dataclass

from bench.plugins import Method


@dataclass
class ExplodingMethod(Method):
    name: str = "explode"

    def compress(self, model, calib, budget):
        raise RuntimeError("boom: simulated failure inside compress")
