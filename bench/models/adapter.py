"""The model-adapter contract: what methods may touch.

Methods never reach into one architecture's internals. They ask the adapter for the decoder blocks, the
linear layers of a block by role, the norms, embeddings and head, and they run blocks one at a time on
cached inputs (what GPTQ-style and block-wise methods need). One adapter per architecture family.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn


@dataclass
class LinearRef:
    """One linear layer of a decoder block, addressed by block index and role."""

    block: int
    role: str
    name: str  # fully qualified module name
    module: nn.Module


@dataclass
class BlockInputs:
    """Hidden states entering block 0 for each calibration batch, plus the keyword arguments (mask,
    rotary embeddings, ...) the model passes to every block."""

    hidden: list[torch.Tensor]
    kwargs: list[dict] = field(default_factory=list)


class _StopForward(Exception):
    pass


class DecoderAdapter:
    """Base for causal decoder-only LMs. Subclasses name the attributes; the logic lives here."""

    kind = "causal_lm"
    architectures: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    norm_feeds: dict[str, tuple[str, ...]] = {}  # norm name -> roles of the linears reading its output
    linear_pairs: tuple[tuple[str, str], ...] = ()  # (a, b): b reads a's output, up to a positive scale
    mlp_out_role: str = ""  # the linear writing the MLP's output back to the residual stream

    def __init__(self, model: nn.Module):
        self.model = model

    # --- structure (subclasses override) -------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        raise NotImplementedError

    def block_norms(self, block: nn.Module) -> dict[str, nn.Module]:
        raise NotImplementedError

    def embeddings(self) -> list[nn.Module]:
        raise NotImplementedError

    def mlp_activation(self, block: nn.Module) -> nn.Module:
        """The MLP's elementwise activation module (SiLU, GELU, ReLU ...), for methods that quantize its output."""
        raise NotImplementedError

    def norm_consumer(self, block: nn.Module, norm: str) -> nn.Module:
        """The smallest submodule that computes everything the norm's linears feed (e.g. self-attention),
        called with the norm's output: what activation-aware searches compare before and after."""
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def attention(self, block: nn.Module) -> nn.Module:
        """The self-attention module; under `eager_attention` its output[1] holds the attention probabilities."""
        return self.norm_consumer(block, "attn")

    @contextmanager
    def eager_attention(self):
        """Compute attention explicitly (softmax probabilities returned) instead of a fused kernel, for methods
        whose loss reads attention maps. Block inputs must be captured inside the context: the model builds
        its attention mask for the implementation in use."""
        config = self.model.config
        before = config._attn_implementation
        config._attn_implementation = "eager"
        try:
            yield
        finally:
            config._attn_implementation = before

    def use_attention(self, name: str, fn) -> None:
        """Compute every self-attention with `fn` from now on (for methods that change how attention multiplies,
        not the weights). `fn` has transformers' attention-function signature, `fn(module, query, key, value,
        attention_mask, scaling, dropout=0.0, **kwargs) -> (output (B, T, heads, head_dim), weights or None)`, with
        query (B, heads, T, head_dim) and key/value (B, kv_heads, S, head_dim), rotary embeddings already applied;
        the mask is the additive float mask eager attention gets. Registered under `name` (process-wide, as
        transformers' interface is), so call it again after loading a model in a new process."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS.register(name, fn)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)  # else the model would build no causal mask at all
        self.model.config._attn_implementation = name

    def head(self) -> nn.Module:
        return self.model.lm_head

    # --- generic logic -------------------------------------------------------------------------------
    def cached(self, t: torch.Tensor) -> torch.Tensor:
        """A hidden state or linear input as the block caches hold it: in the model's dtype (fp32), since under
        bf16 autocast a linear's input may arrive in bf16 (o_proj's, down_proj's) and the methods' statistics,
        Hessians and targets computed from the caches are fp32. A no-op outside autocast."""
        dtype = getattr(self.model, "dtype", torch.float32)
        return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t

    def linears(self) -> Iterator[LinearRef]:
        names = {id(m): n for n, m in self.model.named_modules()}
        for i, block in enumerate(self.blocks()):
            for role, mod in self.block_linears(block).items():
                yield LinearRef(i, role, names[id(mod)], mod)

    def replace_linear(self, ref: LinearRef, new: nn.Module) -> None:
        parent_name, _, attr = ref.name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        setattr(parent, attr, new)
        ref.module = new

    @torch.no_grad()
    def capture_block_inputs(self, batches: list[torch.Tensor]) -> BlockInputs:
        """Run the embedding stage only and record what enters block 0 (stops the forward there)."""
        first = self.blocks()[0]
        captured = BlockInputs(hidden=[], kwargs=[])

        def grab(_module, args, kwargs):
            captured.hidden.append(self.cached(args[0] if args else kwargs.pop("hidden_states")))
            captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _StopForward

        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for ids in batches:
                try:
                    self.model(ids.reshape(1, -1) if ids.dim() == 1 else ids, use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return captured

    @torch.no_grad()
    def run_block(self, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = self.blocks()[index](hidden, **kwargs)
        return self.cached(out[0] if isinstance(out, tuple) else out)

    @torch.no_grad()
    def run_block_capturing(self, index: int, inputs: BlockInputs) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Run block `index` on every cached input; returns its outputs and, per linear role, the inputs
        that linear saw, concatenated over the batches ((batches, seqlen, in_features))."""
        refs = {r.role: r for r in self.linears() if r.block == index}
        feats: dict[str, list[torch.Tensor]] = {role: [] for role in refs}
        hooks = [r.module.register_forward_pre_hook(
            lambda _m, a, role=role: feats[role].append(self.cached(a[0].detach()))) for role, r in refs.items()]
        try:
            outs = [self.run_block(index, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
        finally:
            for h in hooks:
                h.remove()
        return outs, {role: torch.cat(v, dim=0) for role, v in feats.items()}

    def norm_linear_groups(self, index: int) -> list[tuple[nn.Module, list[LinearRef]]]:
        """(norm, the linears that read its output) for block `index`: where a per-channel scale can move
        between a norm's weight and the next linears' input columns without changing the function."""
        refs = {r.role: r for r in self.linears() if r.block == index}
        norms = self.block_norms(self.blocks()[index])
        return [(norms[n], [refs[role] for role in roles]) for n, roles in self.norm_feeds.items()]

    def remove_blocks(self, drop: list[int]) -> None:
        """Delete decoder blocks (depth pruning): later blocks move up, their cache index follows, and the
        config's layer count (and per-layer lists) match the new depth, so generation with a KV cache works."""
        blocks = self.blocks()
        drop = sorted(set(drop))
        if any(not 0 <= i < len(blocks) for i in drop) or len(drop) >= len(blocks):
            raise ValueError(f"cannot remove blocks {drop} of {len(blocks)}")
        for i in reversed(drop):
            del blocks[i]
        for new, block in enumerate(blocks):
            for m in block.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = new
        config = self.model.config
        kept = [i for i in range(config.num_hidden_layers) if i not in drop]
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in kept]
        config.num_hidden_layers = len(kept)

    def n_block_linear_weights(self) -> int:
        return sum(r.module.weight.numel() for r in self.linears())
