"""`ternary`: post-training ternarization, W ~ a_r * t with t in {-1, 0, +1}, per output row r.

Two threshold rules (`rule`):
- `twn` (Li, Zhang, Liu, "Ternary Weight Networks", 2016): threshold D_r = 0.7 * mean |W_r|; t = sign(w) where
  |w| > D_r, else 0; a_r = mean |w| over the kept weights (the closed-form optimum for that support).
- `absmean` (Ma et al., "The Era of 1-bit LLMs", BitNet b1.58, 2024): t = clip(round(w / g_r), -1, 1) with
  g_r = mean |W_r| and a_r = g_r (the paper uses one g per tensor; per row here, like `twn`).
As PTQ these are baselines (BitNet b1.58 and TriLM train ternary weights from scratch). Stored: five trits
per byte (3^5 = 243 <= 256, 1.6 bits per weight) and one fp16 scale per row; execution is fake-quant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from bench.layer_format import LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.quant import pack_levels, unpack_levels
from bench.quant.integer import restore_bias, stored_bias

RULES = ("twn", "absmean")
TWN_THRESHOLD = 0.7


def ternarize(w: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Trits in {-1, 0, 1} and the fp16 per-row scale."""
    mean_abs = w.abs().mean(dim=1, keepdim=True)
    if rule == "twn":
        keep = w.abs() > TWN_THRESHOLD * mean_abs
        t = torch.sign(w) * keep
        scale = (w.abs() * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp(min=1)
    else:
        t = torch.clamp(torch.round(w / mean_abs.clamp(min=1e-8)), -1, 1)
        scale = mean_abs
    return t, scale.to(torch.float16)


@dataclass
class Ternary(Method):
    name: str = "ternary"
    rule: str = "twn"
    family: ClassVar[str] = "binarization"
    paper: ClassVar[str] = "Li et al., Ternary Weight Networks (2016); Ma et al., BitNet b1.58 (2024)"

    def __post_init__(self):
        if self.rule not in RULES:
            raise ConfigError(f"method.rule='{self.rule}' is unknown", f"use one of: {', '.join(RULES)}")

    @torch.no_grad()
    def compress(self, model, calib, budget) -> Packed:
        packed = Packed(model.module, self.name, self.execution)
        for ref in model.adapter.linears():
            w = ref.module.weight.data
            t, scale = ternarize(w.float(), self.rule)
            wq = t * scale.float()
            packed.per_layer.append({**layer_stats(ref, w, wq), "zero_fraction": float((t == 0).float().mean())})
            w.copy_(wq)
            packed.layers[ref.name] = {"qweight": pack_levels((t + 1).to(torch.uint8), 3), "scale": scale,
                                       **stored_bias(ref.module)}
            packed.layer_format[ref.name] = LayerFormat.ternary(f"ternary-{self.rule}-rowscale-fp16")
        return packed

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        out_f, in_f = ref.module.weight.shape
        t = unpack_levels(stored["qweight"], 3, out_f * in_f, (out_f, in_f)).to(torch.float32) - 1
        ref.module.weight.data.copy_(t * stored["scale"].float())
        restore_bias(ref.module, stored)
