"""`smoothquant`: SmoothQuant, "Accurate and Efficient Post-Training Quantization for Large Language Models"
(Xiao, Lin, Seznec, Wu, Demouth, Han; ICML 2023). W8A8 made accurate by migrating activation outliers
into the weights.

For every norm and the linears reading its output (the adapter's norm -> linears groups: attention
input q/k/v, MLP input gate/up or fc1), with X_j the largest |activation| of input channel j over the
calibration tokens and W_j the largest |weight| of column j over those linears:
s_j = max|X_j|^alpha / max|W_j|^(1-alpha); the norm's weight (and bias) is divided by s, the linears'
columns multiplied by s - the same function in exact arithmetic, flatter activations to quantize. Then,
as in the reference's fake-quant (mit-han-lab/smoothquant): weights int8 symmetric per output channel,
activations int8 symmetric per token, dynamic. Linears without a preceding norm (o, down) are not smoothed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.compress.rtn import RTNBase, scale_norm_
from bench.errors import check_range
from bench.layer_format import LayerFormat


@torch.no_grad()
def activation_channel_max(adapter, windows: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """max |x_j| over all calibration tokens at the input of each norm -> linears group, block by block."""
    inputs = adapter.capture_block_inputs(list(windows))
    out: dict[tuple[int, int], torch.Tensor] = {}
    for b in range(len(adapter.blocks())):
        hooks = []
        for gi, (_norm, refs) in enumerate(adapter.norm_linear_groups(b)):
            def record(_m, args, key=(b, gi)):
                m = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)  # fp32: activation max
                out[key] = m if key not in out else torch.maximum(out[key], m)
            hooks.append(refs[0].module.register_forward_pre_hook(record))
        try:
            inputs.hidden = [adapter.run_block(b, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
        finally:
            for h in hooks:
                h.remove()
    return out


@torch.no_grad()
def smooth(adapter, act_max: dict[tuple[int, int], torch.Tensor], alpha: float) -> list[dict]:
    stats = []
    for b in range(len(adapter.blocks())):
        for gi, (norm, refs) in enumerate(adapter.norm_linear_groups(b)):
            w_max = torch.stack([r.module.weight.abs().amax(dim=0) for r in refs]).amax(dim=0).clamp(min=1e-5)
            s = (act_max[(b, gi)].pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
            scale_norm_(norm, s)
            for r in refs:
                r.module.weight.mul_(s.view(1, -1))
            stats.append({"block": b, "group": [r.role for r in refs], "act_max": float(act_max[(b, gi)].max()),
                          "scale_min": float(s.min()), "scale_max": float(s.max())})
    return stats


@dataclass
class SmoothQuant(RTNBase):
    name: str = "smoothquant"
    alpha: float = 0.5
    bits: int = 8
    group_size: int = -1
    symmetric: bool = True
    act_bits: int | None = 8
    paper: ClassVar[str] = "Xiao et al., SmoothQuant: Accurate and Efficient PTQ for LLMs (ICML 2023)"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        check_range("method.alpha", self.alpha, 0.0, 1.0)

    def layer_format(self) -> LayerFormat:
        return LayerFormat.int_grid(self.bits, self.group_size, self.symmetric, prefix=f"smooth{self.alpha:g}")

    @torch.no_grad()
    def compress(self, model, calib, budget):
        act_max = activation_channel_max(model.adapter, calib.windows)
        smoothing = smooth(model.adapter, act_max, self.alpha)
        packed = super().compress(model, calib, budget)
        packed.info["smoothed_groups"] = len(smoothing)
        packed.info["max_activation"] = max(s["act_max"] for s in smoothing)
        return packed
