"""Weight sparsity shared by the pruning methods: patterns, masks from scores, and the stored sparse form.

Patterns: `unstructured` (a fraction `sparsity` of the weights is zero) or `N:M` (in every run of M
consecutive input weights of a row at most N are kept, e.g. 2:4, which NVIDIA's sparse tensor cores run).
Stored form, counted in bits/weight: the kept values in fp16 plus their positions, as a 1-bit mask per
weight (unstructured) or a log2(M)-bit index per kept value (N:M, the 2:4 hardware format). At 50% both
come to 9 bits per weight: pruning alone saves little storage; the point of 2:4 is the kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError, check_range
from bench.layer_format import LayerFormat
from bench.packed import EXECUTION_SPARSE_AS_DENSE, Packed, layer_stats
from bench.plugins import Method
from bench.quant import pack_bits, unpack_bits
from bench.quant.integer import restore_bias, stored_bias


@dataclass(frozen=True)
class Pattern:
    sparsity: float
    n: int = 0  # N:M: kept per group (0 = unstructured)
    m: int = 0

    @classmethod
    def parse(cls, pattern: str, sparsity: float) -> Pattern:
        if pattern == "unstructured":
            check_range("method.sparsity", sparsity, 0.0, 0.99)
            return cls(sparsity)
        try:
            n, m = (int(v) for v in pattern.split(":"))
        except ValueError:
            raise ConfigError(f"sparsity pattern '{pattern}' is unknown",
                              "use unstructured or N:M, e.g. 2:4 or 4:8") from None
        if not (0 < n < m <= 64) or m & (m - 1):
            raise ConfigError(f"sparsity pattern '{pattern}' is not a valid N:M", "use 0 < N < M, M a power of two")
        return cls(1 - n / m, n, m)

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def tag(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"unstructured{self.sparsity:g}"


def keep_top(score: torch.Tensor, pattern: Pattern, per_row: bool = True) -> torch.Tensor:
    """Boolean mask of the weights kept: the highest scores, per row (or over the whole matrix) for
    unstructured, per group of M columns of a row for N:M."""
    rows, cols = score.shape
    if pattern.structured:
        if cols % pattern.m:
            raise ConfigError(f"N:M pattern {pattern.tag} needs the input width ({cols}) to be a multiple of "
                              f"{pattern.m}", "pick an M that divides every layer's width")
        groups = score.reshape(rows, cols // pattern.m, pattern.m)
        idx = torch.topk(groups, pattern.n, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)
    flat = score if per_row else score.reshape(1, -1)
    k = flat.shape[1] - int(flat.shape[1] * pattern.sparsity)  # kept per row (or overall)
    idx = torch.topk(flat, k, dim=1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True).reshape(rows, cols)


def stored_sparse(w: torch.Tensor, kept: torch.Tensor, pattern: Pattern) -> dict[str, torch.Tensor]:
    """fp16 kept values (row-major) and their positions: a bitmap, or log2(M)-bit indices for N:M (a group
    with fewer than N kept values, e.g. after SparseGPT zeroed a kept weight, still stores N slots)."""
    if not pattern.structured:
        return {"values": w[kept].half(), "mask": pack_bits(kept, 1)}
    rows, cols = w.shape
    groups = kept.reshape(rows, cols // pattern.m, pattern.m)
    # N slots per group: the kept positions first (in order), padded with pruned ones whose value is 0
    order = torch.argsort((~groups).to(torch.int8), dim=-1, stable=True)[..., :pattern.n]
    vals = torch.gather(w.reshape(rows, cols // pattern.m, pattern.m), -1, order)
    return {"values": vals.reshape(-1).half(), "index": pack_bits(order.reshape(-1), int(math.log2(pattern.m)))}


def load_sparse(stored: dict[str, torch.Tensor], shape: tuple[int, int], pattern: Pattern) -> torch.Tensor:
    rows, cols = shape
    out = torch.zeros(rows, cols)
    if not pattern.structured:
        kept = unpack_bits(stored["mask"], 1, rows * cols, (rows, cols)).bool()
        out[kept] = stored["values"].float()
        return out
    n_groups = rows * (cols // pattern.m)
    idx = unpack_bits(stored["index"], int(math.log2(pattern.m)), n_groups * pattern.n).long()
    out = out.reshape(n_groups, pattern.m)
    out.scatter_(1, idx.reshape(n_groups, pattern.n), stored["values"].float().reshape(n_groups, pattern.n))
    return out.reshape(rows, cols)


@dataclass
class Pruning(Method):
    """Base of the weight-pruning methods: the pattern, the stored sparse form and its restore."""

    name: str = "pruning"
    sparsity: float = 0.5  # unstructured only; an N:M pattern fixes it at 1 - N/M
    pattern: str = "unstructured"  # or N:M, e.g. 2:4
    family: ClassVar[str] = "pruning"
    execution: ClassVar[str] = EXECUTION_SPARSE_AS_DENSE

    def __post_init__(self):
        Pattern.parse(self.pattern, self.sparsity)

    @property
    def spec(self) -> Pattern:
        return Pattern.parse(self.pattern, self.sparsity)

    def new_packed(self, model) -> Packed:
        packed = Packed(model.module, self.name, self.execution)
        packed.info["sparse_kernel_ran"] = 0  # the CPU backend times dense matmuls on the zeroed weights
        return packed

    @torch.no_grad()
    def store(self, packed: Packed, ref, original: torch.Tensor, pruned: torch.Tensor, kept: torch.Tensor) -> None:
        """Write the pruned weight (kept values at their fp16 storage, exact zeros elsewhere) into the model
        and the packed record."""
        w = torch.where(kept, pruned.half().float(), torch.zeros((), dtype=torch.float32))
        packed.per_layer.append({**layer_stats(ref, original, w), "sparsity": float((w == 0).float().mean())})
        ref.module.weight.data.copy_(w)
        packed.layers[ref.name] = {**stored_sparse(w, kept, self.spec), **stored_bias(ref.module)}
        packed.layer_format[ref.name] = LayerFormat.sparse(self.name, self.spec.tag)

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        ref.module.weight.data.copy_(load_sparse(stored, tuple(ref.module.weight.shape), self.spec))
        restore_bias(ref.module, stored)
