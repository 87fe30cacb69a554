"""Depth pruning shared by the block-removal methods (SLEB, ShortGPT): how many blocks, removal through
the adapter, and an artifact that restores the shallower model (the removed indices travel in its
metadata; the remaining blocks are stored at the model's storage dtype, so bits/weight falls with depth).
ShortGPT's block influence lives here too: layerwise_bits ranks blocks by it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.errors import ConfigError, NotApplicable, check_range
from bench.packed import EXECUTION_DENSE, Packed
from bench.plugins import Method
from bench.precision import fp32


@dataclass
class DepthPruning(Method):
    name: str = "depth"
    ratio: float = 0.1  # fraction of the decoder blocks removed (rounded), unless n_blocks is set
    n_blocks: int | None = None
    family: ClassVar[str] = "pruning"
    execution: ClassVar[str] = EXECUTION_DENSE
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_range("method.ratio", self.ratio, 0.0, 0.9)
        if self.n_blocks is not None and self.n_blocks < 1:
            raise ConfigError(f"method.n_blocks={self.n_blocks} must be at least 1", "or leave it null and set ratio")

    def check_applicable(self, model) -> None:
        """Checked before anything runs: a model too shallow to lose a block, or a ratio that removes none."""
        super().check_applicable(model)
        n = len(model.adapter.blocks())
        if n < 3:
            raise NotApplicable(f"method '{self.name}' needs a model with at least 3 decoder blocks (it keeps 2 and "
                                f"removes 1 or more); '{model.spec.name}' has {n}", "use a deeper model")
        self.n_remove(n)

    def n_remove(self, n_layers: int) -> int:
        n = self.n_blocks if self.n_blocks is not None else round(self.ratio * n_layers)
        if not 1 <= n <= n_layers - 2:
            raise ConfigError(f"removing {n} of {n_layers} blocks is not possible",
                              "remove at least 1 and keep at least 2 (set method.ratio or method.n_blocks)")
        return n

    def record(self, model, removed: list[int], scores: dict) -> Packed:
        """The packed record of a model whose blocks `removed` (original indices) are gone."""
        packed = Packed(model.module, self.name, self.execution)
        packed.extra_metadata["removed_blocks"] = json.dumps(sorted(removed))
        packed.info["blocks_removed"] = len(removed)
        packed.per_layer.append({"removed_blocks": sorted(removed), **scores})
        return packed

    structure_keys: ClassVar[tuple[str, ...]] = ("removed_blocks",)  # metadata that rebuilds the structure

    def rebuild_structure(self, adapter, metadata: dict[str, str]) -> None:
        """Give a fresh base model the compressed model's structure before its tensors are loaded."""
        adapter.remove_blocks(json.loads(metadata["removed_blocks"]))

    def restore(self, model, tensors, metadata):
        self.rebuild_structure(model.adapter, metadata)
        packed = super().restore(model, tensors, metadata)
        packed.extra_metadata.update({k: metadata[k] for k in self.structure_keys})
        return packed


@torch.no_grad()
def block_inputs_all(adapter, inputs) -> list[list[torch.Tensor]]:
    """Hidden states entering every block (and leaving the last) for each cached window."""
    states = [list(inputs.hidden)]
    for b in range(len(adapter.blocks())):
        states.append([adapter.run_block(b, h, kw) for h, kw in zip(states[-1], inputs.kwargs)])
    return states


@torch.no_grad()
def block_influence(adapter, windows: torch.Tensor) -> list[float]:
    """ShortGPT's Block Influence of every block, BI_b = 1 - mean over tokens of cos(h_in, h_out) on the windows."""
    states = block_inputs_all(adapter, adapter.capture_block_inputs(list(windows)))
    bi = []
    with fp32():  # fp32: the block influence's cosines
        for b in range(len(adapter.blocks())):
            cos = torch.cat([F.cosine_similarity(x.float(), y.float(), dim=-1).reshape(-1)
                             for x, y in zip(states[b], states[b + 1])])
            bi.append(float(1 - cos.mean()))
    return bi


@torch.no_grad()
def lm_nll(adapter, hidden: list[torch.Tensor], windows: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of the windows from the last block's output."""
    total, count = 0.0, 0
    for h, ids in zip(hidden, windows):
        logits = adapter.head()(adapter.final_norm()(h)).float()[0, :-1]
        total += float(F.cross_entropy(logits, ids.reshape(-1)[1:], reduction="sum"))
        count += logits.shape[0]
    return total / count
