"""`shortgpt`: ShortGPT, "Layers in Large Language Models are More Redundant Than You Expect" (Men, Xu, Zhang,
Wang, Lin, Lu, Han, Chen; 2024). Block Influence BI_b = 1 - mean over tokens of cos(h_in, h_out), the cosine
between the hidden state entering and leaving block b on the calibration windows; the blocks with the
lowest BI are removed, all at once. `ratio` (or `n_blocks`) sets how many."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.compress.depth import DepthPruning, block_influence


@dataclass
class ShortGPT(DepthPruning):
    name: str = "shortgpt"
    paper: ClassVar[str] = "Men et al., ShortGPT: Layers in LLMs are More Redundant Than You Expect (2024)"

    @torch.no_grad()
    def compress(self, model, calib, budget):
        adapter = model.adapter
        bi = block_influence(adapter, calib.windows)
        drop = sorted(range(len(bi)), key=lambda b: bi[b])[:self.n_remove(len(bi))]
        adapter.remove_blocks(drop)
        return self.record(model, drop, {"block_influence": bi})
