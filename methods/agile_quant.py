"""`agile_quant`: Agile-Quant, "Activation-Guided Quantization for Faster Inference of LLMs on the Edge" (Shen, Dong,
Lu, Kong, Li, Lin, Wu, Wang; AAAI 2024, arXiv 2312.05693), its accuracy side. Reference code read:
shawnricecake/agile-quant (gptq_fq_quant_llama.py, run-gptq-llama.sh, transformers/models/llama/modeling_llama.py
and configuration_llama.py, ptq/ from FQ-ViT); written anew here. Of the paper: its abstract and public summaries
(activation quantization balanced for edge latency; activation-aware token pruning against the outliers and the
loss of attentivity; a SIMD 4-bit multiplier and the TRIP matrix multiplication); its full text was not available
offline.

1. Weights: GPTQ (the suite's `bench.compress.gptq`, the reference's first stage), `bits` = 4, groups of 128,
   act-order, asymmetric min/max grid, as the reference's run script.
2. Activations, static, calibrated with min/max on the calibration windows on the weight-quantized model (the
   reference: FQ-ViT's MinMax observer, symmetric signed grid, scale = absmax / ((2^b - 1) / 2)):
   - the input of every block linear: `act_bits` (8), one scale per input channel ("channel_wise"): the outlier
     channels of LLM activations get their own range, the activation-guided part; a per-input-channel scale folds
     into the weight's columns, so an integer kernel can run it;
   - inside self-attention (bench.quant.attention, through the adapter's `use_attention`): query, key and value at
     `act_bits` with one scale per head (key and value per key/value head: the KV cache holds them);
   - the softmax probabilities: `probs_bits` (4) log2 quantization (2^-c, c in [0, 15], smaller probabilities 0).
   Calibration runs without activation quantization and with token pruning on, as the reference's.
3. Token pruning of the inattentive tokens: in each block of `prune_blocks`, the tokens whose attention to the first
   token (softmax probability, summed over heads: the reference's default token importance) is lowest, a fraction
   `prune_ratio` of the tokens still in the sequence, are pruned after that block's attention. Here the pruning is
   emulated on the full sequence so that every task scores every token: a pruned token's hidden state is kept as it
   leaves its pruning block and passed unchanged through the remaining blocks (to the final norm and the head), and
   no later query attends to it (its key is masked, except its own). The reference drops the token from the
   sequence instead and removes its label from the perplexity (the pruned tokens are never scored); its pruned
   token also skips its pruning block's MLP (here it gets it); it renumbers the positions of the remaining tokens
   (here they keep theirs). Single-token (decoding) steps are not pruned, as in the reference.
   Defaults: the released configuration has every pruning and lower-bit ratio at 0 and the paper's schedules were
   not available; `prune_ratio` 0.1 at blocks [10, 20] is this suite's choice (the record states it).
Not included: the SIMD-based 4-bit multiplier and the TRIP matrix multiplication (Arm Compute Library kernels for
the edge devices) are out of reach here: execution is fake-quant (values on their grids, fp32 arithmetic), its CPU
time that of the emulation, never of Agile-Quant's kernels; the 4-bit activations for the least important tokens
(the reference's lower_bit_percent, 0 in the released configuration) are not used.
Artifact: GPTQ's packed codes, fp16 scales and zero points, column order; per linear the fp16 per-input-channel
activation scales; the per-head query / key / value scales stored with the q / k / v projections; all counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from bench.compress.gptq import gptq_layer_into, restore_gptq_layer
from bench.compress.hessian import quantize_blockwise
from bench.errors import ConfigError, check_bits, check_range
from bench.layer_format import ActFormat, LayerFormat
from bench.models import adapter_for
from bench.packed import Packed
from bench.plugins import Method
from bench.quant import attention
from bench.quant.activation import channel_absmax, fake_quant_channels, fake_quant_log2, symmetric_scale

ATTENTION_TENSORS = {"query": "q", "key": "k", "value": "v"}  # quantized per head; scale stored with this projection


class TokenPruner:
    """Agile-Quant's token pruning, emulated on the full sequence (see the module docstring). Per forward: reset by
    the model's pre-hook; a pruning block's attention observer picks the tokens to prune; that block's forward hook
    adds them to the pruned set; every block passes the tokens pruned before it through unchanged."""

    def __init__(self, ratio: float, blocks: tuple[int, ...]):
        self.ratio, self.blocks = ratio, set(blocks)
        self.pruned: torch.Tensor | None = None  # (B, T) bool: pruned before the block running now
        self.picked: torch.Tensor | None = None  # pruned by the block running now
        self.counts: list[float] = []  # fraction of the tokens pruned after each forward (for the record)
        self.hooks: list = []  # its hook handles on the model and its blocks

    def reset(self, *_):
        self.pruned = self.picked = None

    def key_mask(self, block: int, t: int, s: int) -> torch.Tensor | None:
        if self.pruned is None or t == 1 or self.pruned.shape[1] != s or not self.pruned.any():
            return None  # decoding steps and cached prefixes are not pruned
        masked = self.pruned[:, None, None, :s] & ~torch.eye(t, s, dtype=torch.bool)  # its own key stays
        return torch.zeros(masked.shape).masked_fill(masked, torch.finfo(torch.float32).min)

    def observe(self, view: attention.AttentionView) -> None:
        if view.block not in self.blocks or view.probs.shape[-2] == 1:
            return
        score = attention.first_token_attention(view.probs)
        alive = torch.ones_like(score, dtype=torch.bool) if self.pruned is None else ~self.pruned
        picked = torch.zeros_like(alive)
        for row in range(score.shape[0]):
            n = int(int(alive[row].sum()) * self.ratio)
            if n:
                candidates = score[row].masked_fill(~alive[row], float("inf"))
                picked[row, torch.topk(candidates, n, largest=False).indices] = True
        self.picked = picked

    def block_hooks(self, block: torch.nn.Module) -> list:
        state = {}

        def before(_m, args, kwargs):
            state["pruned"] = self.pruned
            state["hidden"] = args[0] if args else kwargs["hidden_states"]

        def after(_m, _args, _kwargs, out):
            hidden = out[0] if isinstance(out, tuple) else out
            if state["pruned"] is not None and hidden.shape[1] > 1:
                hidden = torch.where(state["pruned"][..., None], state["hidden"].to(hidden.dtype), hidden)
            if self.picked is not None:
                self.pruned = self.picked if self.pruned is None else self.pruned | self.picked
                self.picked = None
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        return [block.register_forward_pre_hook(before, with_kwargs=True),
                block.register_forward_hook(after, with_kwargs=True)]

    def record(self, *_):
        if self.pruned is not None:
            self.counts.append(float(self.pruned.float().mean()))


@dataclass
class AgileQuant(Method):
    name: str = "agile_quant"
    bits: int = 4
    group_size: int = 128  # -1 = per output channel
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    act_bits: int = 8
    probs_bits: int = 4
    prune_ratio: float = 0.1
    prune_blocks: list[int] = field(default_factory=lambda: [10, 20])
    family: ClassVar[str] = "quantization"
    paper: ClassVar[str] = ("Shen et al., Agile-Quant: Activation-Guided Quantization for Faster Inference of LLMs on "
                            "the Edge (AAAI 2024)")
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_bits("method.bits", self.bits, 2, 8)
        check_bits("method.act_bits", self.act_bits, 2, 16)
        check_bits("method.probs_bits", self.probs_bits, 2, 8)
        check_range("method.damp", self.damp, 1e-6, 1.0)
        check_range("method.block_size", self.block_size, 1, 1 << 16)
        check_range("method.prune_ratio", self.prune_ratio, 0.0, 0.9)
        self.prune_blocks = [int(b) for b in self.prune_blocks]
        if any(b < 0 for b in self.prune_blocks):
            raise ConfigError(f"method.prune_blocks={self.prune_blocks} has a negative block index",
                              "use block indices counted from 0")

    def _attention_format(self, what: str) -> str:
        return f"{what}-{ActFormat(self.act_bits, 'int', 'per_head', 'static').label}"

    def layer_format(self, role: str = "") -> LayerFormat:
        notes = tuple(self._attention_format(w) for w, r in ATTENTION_TENSORS.items() if r == role)
        if role == "v":
            notes += (f"probs-{ActFormat(self.probs_bits, 'int', detail=('log2',)).label}",)
        grid = LayerFormat.int_grid(self.bits, self.group_size, False, prefix="agile_quant", act_order=self.act_order)
        return dataclasses.replace(grid, act=ActFormat(self.act_bits, "int", "per_channel", "static"), notes=notes)

    def compress(self, model, calib, budget) -> Packed:
        self.check_applicable(model)
        n_blocks = len(model.adapter.blocks())
        if any(b >= n_blocks for b in self.prune_blocks):
            raise ConfigError(f"method.prune_blocks={self.prune_blocks} names a block the model does not have "
                              f"({n_blocks} blocks)", f"use block indices in [0, {n_blocks - 1}], or [] for none")
        packed = Packed(model.module, self.name, self.execution)

        def quantize_layer(r, H):
            gptq_layer_into(packed, r, H, self.layer_format(r.role), self.bits, self.group_size, False,
                            self.act_order, self.damp, self.block_size)

        quantize_blockwise(model.adapter, calib.windows, quantize_layer, self.name)
        self._calibrate(model, packed, calib.windows)
        packed.info["calib_tokens"] = int(calib.windows.numel())
        return self.runtime_hooks(model, packed)

    @torch.no_grad()
    def _calibrate(self, model, packed, windows: torch.Tensor) -> None:
        """Min/max ranges of every quantized activation on the weight-quantized model, pruning on, quantization off."""
        adapter = model.adapter
        ranges: dict[str, torch.Tensor] = {}

        def observe(key: str, dim: int):
            def fn(x):
                m = channel_absmax(x, dim)
                ranges[key] = m if key not in ranges else torch.maximum(ranges[key], m)
                return x
            return fn

        def input_observer(name: str):
            record = observe(name, -1)

            def hook(_m, args):
                record(args[0])  # returns None: the input is left as it is
            return hook

        hooks = [r.module.register_forward_pre_hook(input_observer(r.name)) for r in adapter.linears()]
        names = {(r.block, r.role): r.name for r in adapter.linears()}
        quants = {i: attention.AttentionQuant(i, **{w: observe(f"{names[(i, r)]}:{w}", 1)
                                                    for w, r in ATTENTION_TENSORS.items()})
                  for i in range(len(adapter.blocks()))}
        with adapter.eager_attention():  # the base model's attention implementation comes back afterwards
            pruner = self._attach(adapter, quants)
            try:
                for ids in windows.split(1):
                    model.module(ids, use_cache=False)
            finally:
                for h in hooks + pruner.hooks:
                    h.remove()
                attention.detach(adapter)
        for ref in adapter.linears():
            stored = packed.layers[ref.name]
            stored["act_scale"] = symmetric_scale(ranges[ref.name], self.act_bits)
            for what, role in ATTENTION_TENSORS.items():
                if role == ref.role:
                    stored[f"attn_{what}_scale"] = symmetric_scale(ranges[f"{ref.name}:{what}"], self.act_bits)
        if pruner.counts:
            packed.info["calib_pruned_token_fraction"] = sum(pruner.counts) / len(pruner.counts)

    def _attach(self, adapter, quants: dict[int, attention.AttentionQuant]) -> TokenPruner:
        """Token pruning and the attention quantizers `quants` on the adapter's model; the pruner's hooks are in
        its `hooks`."""
        pruner = TokenPruner(self.prune_ratio, tuple(self.prune_blocks))
        pruner.hooks = [adapter.model.register_forward_pre_hook(pruner.reset),
                        adapter.model.register_forward_hook(pruner.record)]
        if self.prune_ratio > 0 and self.prune_blocks:
            for q in quants.values():
                q.key_mask = pruner.key_mask
                q.observers.append(pruner.observe)
            for block in adapter.blocks():
                pruner.hooks += pruner.block_hooks(block)
        attention.attach(adapter, quants)
        return pruner

    def restore_layer(self, model, ref, stored) -> None:
        restore_gptq_layer(ref, stored, self.bits, self.group_size)

    def runtime_hooks(self, model, packed):
        """Static activation quantizers, log2 probabilities and token pruning (after compress and restore alike)."""
        adapter = adapter_for(packed.model)
        names = {(r.block, r.role): r.name for r in adapter.linears()}
        for ref in adapter.linears():
            scale, bits = packed.layers[ref.name]["act_scale"], self.act_bits
            ref.module.register_forward_pre_hook(
                lambda _m, args, s=scale: (fake_quant_channels(args[0], s, bits, -1), *args[1:]))

        def per_head(i: int, what: str):
            s = packed.layers[names[(i, ATTENTION_TENSORS[what])]][f"attn_{what}_scale"]
            return lambda x: fake_quant_channels(x, s, self.act_bits, 1)

        quants = {i: attention.AttentionQuant(i, **{w: per_head(i, w) for w in ATTENTION_TENSORS},
                                              probs=lambda p: fake_quant_log2(p, self.probs_bits))
                  for i in range(len(adapter.blocks()))}
        self._attach(adapter, quants)
        packed.info["activations"] = (f"a{self.act_bits}-per_channel-static (block linear inputs); attention: query, "
                                      f"key and value (KV cache) a{self.act_bits}-per_head-static, probabilities "
                                      f"a{self.probs_bits}-log2")
        packed.info["token_pruning"] = (f"{self.prune_ratio:g} of the remaining tokens after the attention of blocks "
                                        f"{self.prune_blocks}, by attention to the first token; emulated (kept "
                                        "hidden states, masked keys), every token scored")
        return packed
