"""`awq`: AWQ, "Activation-aware Weight Quantization for On-Device LLM Compression and Acceleration"
(Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han; MLSys 2024). Weight-only, group-wise.

Per decoder block, on the calibration windows (block by block through the adapter; the next block's input
is the unquantized block's output, as in the reference mit-han-lab/llm-awq):
1. Scale search. For each group of linears reading one input - the norm -> linears groups (q/k/v, gate/up)
   and the linear -> linear pairs (v -> o when shapes match, up -> down) - with s_x the mean |activation| per
   input channel, try s = s_x^r for r = 0, 1/20, ..., 19/20 (normalised by sqrt(max s * min s)); quantize
   W * s with RTN and divide by s; keep the r with the smallest MSE of the consuming module's output
   (attention, MLP, or the linear itself). Fold 1/s into the producer (norm weight, or the previous
   linear's rows) and s into the linears - exact before quantization.
2. Clipping search. For every linear except q and k (whose product the search cannot see), per output row
   and group, shrink the max |w| by 0, 5, ..., 45% and keep the value that minimises the group's output MSE
   on 512 sampled tokens; clamp the weights to it. A last group shorter than the group size (576 inputs at
   g128) is searched like the others; the reference requires whole groups.
3. RTN: the suite's `rtn` quantizer (bits, group size, asymmetric with GPTQ's grid) on every block linear.
   Only the quantizer's grid differs from the reference's (which does not force 0 into the range); rtn and
   awq therefore differ by exactly AWQ's scaling and clipping.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.compress.rtn import RTNBase, scale_norm_
from bench.layer_format import LayerFormat
from bench.precision import fp32
from bench.progress import each_block
from bench.quant import quantize_rtn, resolve_group_size
from bench.quant.integer import expand_groups, group_minmax

N_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_TOKENS = 512


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _accepted(module: nn.Module, kwargs: dict) -> dict:
    """The block keyword arguments (rotary embeddings, mask) that `module.forward` takes: attention takes
    them, an MLP or a linear takes none."""
    params = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _output_error(consumer: nn.Module, linears: list[nn.Module], x: torch.Tensor, kwargs: dict):
    """A function giving the MSE of `consumer`'s output on x against its output now, as `linears` change.
    A linear consuming its own input needs no forward: the MSE is the quadratic form of the weight change
    with the Gram matrix x^T x (the same number, 20 forwards of all calibration tokens saved)."""
    if len(linears) == 1 and consumer is linears[0] and isinstance(consumer, nn.Linear):
        flat = x.reshape(-1, x.shape[-1]).float()
        with fp32():  # fp32: the Gram matrix x^T x
            gram = (flat.T @ flat).double()
        before = consumer.weight.data.clone().double()

        @fp32  # fp32 (float64 here): the search's quadratic-form error
        def linear_error() -> float:
            d = consumer.weight.data.double() - before
            return float(((d @ gram) * d).sum()) / (flat.shape[0] * d.shape[0])
        return linear_error
    reference = _first(consumer(x, **kwargs)).float()

    def forward_error() -> float:  # the consumer runs in the run's precision; its error is compared in fp32
        return float((reference - _first(consumer(x, **kwargs)).float()).pow(2).mean())
    return forward_error


@dataclass
class AWQ(RTNBase):
    name: str = "awq"
    clip: bool = True
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = "Lin et al., AWQ: Activation-aware Weight Quantization (MLSys 2024)"
    needs_calibration: ClassVar[bool] = True

    def layer_format(self) -> LayerFormat:
        return LayerFormat.int_grid(self.bits, self.group_size, self.symmetric, prefix="awq")

    def _fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return quantize_rtn(w, self.bits, self.group_size, self.symmetric).dequantize()

    @torch.no_grad()
    def _search_scale(self, consumer: nn.Module, linears: list[nn.Module], x: torch.Tensor, kwargs: dict
                      ) -> tuple[torch.Tensor, float]:
        output_error = _output_error(consumer, linears, x, kwargs)
        x_mean = x.float().abs().reshape(-1, x.shape[-1]).mean(dim=0)  # fp32: activation statistics
        originals = [lin.weight.data.clone() for lin in linears]
        best, best_ratio, best_scales = float("inf"), -1.0, None
        for step in range(N_GRID):
            ratio = step / N_GRID
            s = x_mean.pow(ratio).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w in zip(linears, originals):
                lin.weight.data = self._fake_quant(w * s.view(1, -1)) / s.view(1, -1)
            loss = output_error()
            if loss < best:
                best, best_ratio, best_scales = loss, ratio, s.clone()
        for lin, w in zip(linears, originals):
            lin.weight.data = w
        return best_scales, best_ratio

    @torch.no_grad()
    @fp32  # fp32: the clipping search's group output errors (x @ delta^T)
    def clip_limits(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per (row, group) max |w| after clipping, expanded to w's shape; w (out, in), x (tokens, in). The
        groups are the quantizer's column slices; the last may be shorter (576 = 4 x 128 + 64)."""
        in_f = w.shape[1]
        g = resolve_group_size(self.group_size, in_f)
        x = x[:: max(1, x.shape[0] // CLIP_TOKENS)][:CLIP_TOKENS].float()
        starts = range(0, in_f, g)
        org_max = group_minmax(w.abs(), g)[1]  # (out, groups)
        best_err = torch.full_like(org_max, float("inf"))
        best = org_max.clone()
        for i in range(int(CLIP_MAX_SHRINK * N_GRID)):
            max_val = org_max * (1 - i / N_GRID)
            bound = expand_groups(max_val, g, in_f)
            delta = self._fake_quant(torch.clamp(w, -bound, bound)) - w
            # each group's output error, mean over tokens: the reference's ((x * q).sum - (x * w).sum)^2
            err = torch.stack([(x[:, c:c + g] @ delta[:, c:c + g].T).pow(2).mean(dim=0) for c in starts], dim=1)
            better = err < best_err
            best_err[better], best[better] = err[better], max_val[better]
        return expand_groups(best, g, in_f)

    @torch.no_grad()
    def compress(self, model, calib, budget):
        searched = self.scale_and_clip(model, calib)
        packed = super().compress(model, calib, budget)
        packed.info["mean_scale_ratio"] = sum(s["ratio"] for s in searched) / max(len(searched), 1)
        packed.per_layer.extend({"awq_search": s} for s in searched)
        return packed

    @torch.no_grad()
    def scale_and_clip(self, model, calib) -> list[dict]:
        """Steps 1 and 2, in place on the fp weights; returns the searched ratios."""
        adapter = model.adapter
        inputs = adapter.capture_block_inputs(list(calib.windows))
        searched = []
        for b in each_block("awq search", len(adapter.blocks())):
            block = adapter.blocks()[b]
            refs = {r.role: r for r in adapter.linears() if r.block == b}
            outs, x = adapter.run_block_capturing(b, inputs)  # x[role]: (windows, seqlen, in), one batch
            kw = inputs.kwargs[0]  # rotary embeddings and mask of one window broadcast over the batch
            norms = adapter.block_norms(block)
            # 1. scales: norm -> linears groups, then linear -> linear pairs
            for norm_name, roles in adapter.norm_feeds.items():
                consumer = adapter.norm_consumer(block, norm_name)
                lins = [refs[r].module for r in roles]
                s, ratio = self._search_scale(consumer, lins, x[roles[0]], _accepted(consumer, kw))
                scale_norm_(norms[norm_name], s)
                for lin in lins:
                    lin.weight.mul_(s.view(1, -1))
                for r in roles:
                    x[r] = x[r] / s
                searched.append({"block": b, "scaled": list(roles), "ratio": ratio})
            for a, c in adapter.linear_pairs:
                prev, lin = refs[a].module, refs[c].module
                if prev.weight.shape[0] != lin.weight.shape[1]:
                    continue  # e.g. v -> o under grouped-query attention (the reference skips it too)
                s, ratio = self._search_scale(lin, [lin], x[c], {})
                prev.weight.div_(s.view(-1, 1))
                if prev.bias is not None:  # stored in fp16 beside the quantized weight
                    prev.bias.copy_((prev.bias / s).half().float())
                lin.weight.mul_(s.view(1, -1))
                x[c] = x[c] / s
                searched.append({"block": b, "scaled": [c], "after": a, "ratio": ratio})
            # 2. clipping
            if self.clip:
                for role, r in refs.items():
                    if role in ("q", "k"):
                        continue
                    w = r.module.weight.data
                    limit = self.clip_limits(w, x[role].reshape(-1, w.shape[1]))
                    r.module.weight.data = torch.clamp(w, -limit, limit)
            inputs.hidden = outs
        return searched
