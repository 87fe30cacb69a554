"""`shortgpt`: ShortGPT, "Layers in Large Language Models are More Redundant Than You Expect" (Men, Xu, Zhang,
Wang, Lin, Lu, Han, Chen; 2024). Block Influence BI_b = 1 - mean over tokens of cos(h_in, h_out), the cosine
between the hidden state entering and leaving block b on the calibration windows; the blocks with the
lowest BI are removed, all at once. `ratio` (or `n_blocks`) sets how many."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.compress.depth import DepthPruning, block_inputs_all
from bench.precision import fp32


@dataclass
class ShortGPT(DepthPruning):
    name: str = "shortgpt"
    paper: ClassVar[str] = "Men et al., ShortGPT: Layers in LLMs are More Redundant Than You Expect (2024)"

    @torch.no_grad()
    def compress(self, model, calib, budget):
        adapter = model.adapter
        states = block_inputs_all(adapter, adapter.capture_block_inputs(list(calib.windows)))
        bi = []
        with fp32():  # fp32: the block influence's cosines
            for b in range(len(adapter.blocks())):
                cos = torch.cat([F.cosine_similarity(x.float(), y.float(), dim=-1).reshape(-1)
                                 for x, y in zip(states[b], states[b + 1])])
                bi.append(float(1 - cos.mean()))
        drop = sorted(range(len(bi)), key=lambda b: bi[b])[:self.n_remove(len(bi))]
        adapter.remove_blocks(drop)
        return self.record(model, drop, {"block_influence": bi})
