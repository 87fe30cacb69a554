"""`foldgpt`: FoldGPT, "Simple and Effective Large Language Model Compression Scheme" (Liu, Zeng, Li, Yan, Fu,
Mei, Chen; arXiv 2407.00928, 2024). No public reference code: written from the paper's description.

1. Gated block removal. Every decoder block's residual update gets a learnable gate,
       y = x + g_b (block_b(x) - x),  g_b in [0, 1], initialised at 1,
   trained jointly (all weights frozen) by distillation from the uncompressed model, KL(teacher || student)
   on logits (per token), plus `polar_weight` x the polarization regulariser (Zhuang et al., NeurIPS 2020) that drives
   the gates apart, towards 0 and towards their mean's far side:
       R(g) = sum_b f_b (t |g_b| - |g_b - mean(g)|),  t = `polar_t`,
   with f_b each block's share of the FLOPs (the paper's FLOPs constraint; equal for a uniform stack).
   Training all gates together lets the ranking see how blocks compensate for each other. The `ratio`
   (or `n_blocks`) blocks with the smallest gates are removed; the survivors run ungated (the gates rank).
2. Group parameter sharing. Of the surviving blocks (never the first), the `share_ratio` x depth (or
   `n_shared`) with the next-smallest gates become children: each runs the linear weights of the nearest
   surviving parent block before it and keeps its own norms. The shared weights are stored once.
3. Recovery. The norms (every block's and the final one) are re-adapted by distillation with the paper's
   tail-layer term: KL on logits + `tail_scale` x MSE of the last hidden state. Steps from `budget=`; the
   learning rates `gate_lr` and `norm_lr` are this implementation's choices (the paper's are not stated for
   a model this size). Measured on the default model (24 steps of 128 tokens): with `polar_weight` 0.01
   every gate stayed within 0.984-0.999 (no polarization); with 1.0 the gates split into a cluster near
   0.87 and the blocks the KD term defends (0-2, 10, 19, 20, 28, 29) near 1.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.compress.depth import DepthPruning
from bench.compress.distill import distill, kd_logits
from bench.errors import ConfigError, NumericalFailure, check_range
from bench.models import round_to_storage
from bench.training import StageRecord, TrainingRecord


def share_blocks(adapter, parents: dict[int, int]) -> None:
    """Make each child block (key) run its parent's (value) linear weights and biases: one tensor, two users."""
    blocks = adapter.blocks()
    for child, parent in parents.items():
        source = adapter.block_linears(blocks[parent])
        for role, linear in adapter.block_linears(blocks[child]).items():
            linear.weight = source[role].weight
            if linear.bias is not None:
                linear.bias = source[role].bias


def _gated(adapter, gates: nn.Parameter) -> list:
    """Hooks scaling each block's residual update by its gate."""
    def hook(_module, args, kwargs, out, b):
        x = args[0] if args else kwargs["hidden_states"]
        y = out[0] if isinstance(out, tuple) else out
        y = x + gates[b] * (y - x)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    return [block.register_forward_hook(lambda m, a, k, o, b=b: hook(m, a, k, o, b), with_kwargs=True)
            for b, block in enumerate(adapter.blocks())]


@dataclass
class FoldGPT(DepthPruning):
    name: str = "foldgpt"
    share_ratio: float = 0.1  # fraction of all blocks that become weight-sharing children, unless n_shared is set
    n_shared: int | None = None
    polar_weight: float = 1.0
    polar_t: float = 1.0
    gate_lr: float = 1e-2
    norm_lr: float = 1e-3
    tail_scale: float = 1.0
    seed: int = 0
    paper: ClassVar[str] = "Liu et al., FoldGPT: Simple and Effective Large Language Model Compression Scheme (2024)"
    structure_keys: ClassVar[tuple[str, ...]] = ("removed_blocks", "shared_blocks")

    def __post_init__(self):
        super().__post_init__()
        check_range("method.share_ratio", self.share_ratio, 0.0, 0.9)
        if self.n_shared is not None and self.n_shared < 0:
            raise ConfigError(f"method.n_shared={self.n_shared} must be >= 0", "or leave it null and set share_ratio")
        for key in ("polar_weight", "polar_t", "tail_scale"):
            check_range(f"method.{key}", getattr(self, key), 0.0, 1e6)
        for key in ("gate_lr", "norm_lr"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"method.{key}={getattr(self, key)} must be positive", f"set method.{key} > 0")

    def n_share(self, n_layers: int, n_removed: int) -> int:
        n = self.n_shared if self.n_shared is not None else round(self.share_ratio * n_layers)
        if n > n_layers - n_removed - 1:
            raise ConfigError(f"sharing {n} of the {n_layers - n_removed} blocks left after removal is not possible",
                              "at least one block must keep its own weights (lower method.share_ratio/n_shared)")
        return n

    def rebuild_structure(self, adapter, metadata):
        super().rebuild_structure(adapter, metadata)
        share_blocks(adapter, {int(c): p for c, p in json.loads(metadata["shared_blocks"]).items()})

    def _train_gates(self, teacher, student, calib, budget) -> tuple[list[float], StageRecord]:
        adapter = student.adapter
        n = len(adapter.blocks())
        gates = nn.Parameter(torch.ones(n))
        flops_share = torch.full((n,), 1.0 / n)  # a uniform stack: every block has the same FLOPs
        for p in student.module.parameters():
            p.requires_grad_(False)
        handles = _gated(adapter, gates)

        def loss_fn(t_out, s_out):  # KD per token, so the regulariser's weight does not depend on the window length
            kd = kd_logits(s_out.logits, t_out.logits) / s_out.logits.shape[1]
            polar = (flops_share * (self.polar_t * gates.abs() - (gates - gates.mean()).abs())).sum()
            return kd + self.polar_weight * polar, {"kd": kd.item(), "polar": self.polar_weight * polar.item()}

        def project(_step):  # gates stay in [0, 1]
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)

        try:
            history = distill(teacher, student.module, [gates], calib.windows,
                              dataclasses.replace(budget, lr=self.gate_lr), self.seed, loss_fn, "foldgpt gates",
                              after_step=project, heldout=calib.heldout,
                              objective=f"kd = KL(teacher || student) per token + polar = {self.polar_weight:g} x "
                                        f"polarization R(g) (t={self.polar_t:g}; can be negative); terms as weighted")
        finally:
            for h in handles:
                h.remove()
        return gates.detach().tolist(), history

    def _recover_norms(self, teacher, student, calib, budget) -> StageRecord:
        adapter = student.adapter
        norms = [m.weight for block in adapter.blocks() for m in adapter.block_norms(block).values()]
        norms.append(adapter.final_norm().weight)
        for p in norms:
            p.requires_grad_(True)

        def loss_fn(t_out, s_out):
            kd = kd_logits(s_out.logits, t_out.logits)
            tail = F.mse_loss(s_out.hidden_states[-1].float(), t_out.hidden_states[-1].float())
            return kd + self.tail_scale * tail, {"kd": kd.item(), "tail": self.tail_scale * tail.item()}

        history = distill(teacher, student.module, norms, calib.windows, dataclasses.replace(budget, lr=self.norm_lr),
                          self.seed, loss_fn, "foldgpt norm recovery", heldout=calib.heldout,
                          objective=f"kd = KL(teacher || student) on logits (batchmean) + tail = {self.tail_scale:g} x "
                                    "MSE(last hidden state); terms as weighted")
        with torch.no_grad():  # what runs is what the artifact stores
            round_to_storage(student.module, getattr(torch, student.spec.storage_dtype))
        for p in student.module.parameters():
            p.requires_grad_(False)
        return history

    def compress(self, model, calib, budget):
        adapter = model.adapter
        n_layers = len(adapter.blocks())
        n_remove = self.n_remove(n_layers)
        n_share = self.n_share(n_layers, n_remove)
        teacher = copy.deepcopy(model.module)
        gates, gate_history = self._train_gates(teacher, model, calib, budget)
        if max(gates) - min(gates) < 1e-6:  # a tie would remove the first blocks by index: refuse instead
            raise NumericalFailure("foldgpt's gates did not separate (all equal)",
                                   "raise method.polar_weight or the budget's steps")
        ranked = sorted(range(n_layers), key=lambda b: gates[b])
        removed = sorted(ranked[:n_remove])
        alive = [b for b in range(n_layers) if b not in removed]
        children = set([b for b in ranked[n_remove:] if b != alive[0]][:n_share])  # next-smallest gates
        parents, last_parent = {}, None
        for new, b in enumerate(alive):
            if b in children:
                parents[new] = last_parent
            else:
                last_parent = new
        adapter.remove_blocks(removed)
        share_blocks(adapter, parents)
        norm_history = self._recover_norms(teacher, model, calib, budget)
        packed = self.record(model, removed, {"gates": gates, "shared_blocks": parents})
        packed.extra_metadata["shared_blocks"] = json.dumps(parents)
        packed.info["blocks_shared"] = len(parents)
        packed.training = TrainingRecord([gate_history, norm_history])
        return packed
