"""`sleb`: SLEB, "Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks"
(Song, Oh, Kim, Kim, Lee, Lee; ICML 2024; reference jiwonsong-dev/SLEB). Blocks are removed one at a time:
at each step, every remaining candidate is tried and the one whose removal gives the lowest calibration
perplexity goes. The first and the last block are never candidates. Each step caches the hidden state
entering every block once, so trying block j only reruns the blocks after it.

Calibration: the first `search_windows` windows of `calib=` (the reference uses 128 x 2048 tokens; the
default here keeps the search within minutes on a CPU: the cost is about steps x blocks^2 / 2 block runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.compress.depth import DepthPruning, block_inputs_all, lm_nll
from bench.errors import check_range


@dataclass
class SLEB(DepthPruning):
    name: str = "sleb"
    search_windows: int = 16
    paper: ClassVar[str] = "Song et al., SLEB: Streamlining LLMs through Elimination of Transformer Blocks (ICML 2024)"

    def __post_init__(self):
        super().__post_init__()
        check_range("method.search_windows", self.search_windows, 1, 1 << 20)

    @torch.no_grad()
    def compress(self, model, calib, budget):
        adapter = model.adapter
        windows = calib.windows[:self.search_windows]
        n_layers = len(adapter.blocks())
        alive = list(range(n_layers))  # original indices of the remaining blocks
        history = []
        for _ in range(self.n_remove(n_layers)):
            inputs = adapter.capture_block_inputs(list(windows))
            states = block_inputs_all(adapter, inputs)
            best = None
            for pos in range(1, len(alive) - 1):  # never the first or the last block
                hidden = states[pos]  # skip block `pos`: its input goes to the block after it
                for b in range(pos + 1, len(alive)):
                    hidden = [adapter.run_block(b, h, kw) for h, kw in zip(hidden, inputs.kwargs)]
                nll = lm_nll(adapter, hidden, windows)
                if best is None or nll < best[1]:
                    best = (pos, nll)
            history.append({"removed": alive[best[0]], "calib_ppl": float(torch.tensor(best[1]).exp())})
            adapter.remove_blocks([best[0]])
            del alive[best[0]]
        removed = sorted(set(range(n_layers)) - set(alive))
        return self.record(model, removed, {"sleb_steps": history})
