"""Activation quantization inside self-attention: the query and the key as q.k^T multiplies them (after the rotary
embedding), the key and the value as the KV cache holds them, and the softmax probabilities as they multiply the
value, each through its own quantizer (fake-quant: values on the grid, fp32 arithmetic).

It runs through the model adapter's `use_attention`, so it covers every architecture the adapter covers. Each
self-attention module carries an `AttentionQuant` (a plain attribute, not a submodule: the model's state dict is
unchanged; methods store the quantizers' parameters in their artifact themselves). A module without one computes
exact eager attention. Per call the computation is eager attention's (transformers' `eager_attention_forward`):
    q, k, v = Q(query), K(key), V(value)            (k and v per key/value head, before grouped heads repeat)
    scores = S(q k^T * scaling)                      (before the mask: what the EdgeQAT reference compares)
    probs = P(softmax(scores + mask [+ extra key mask], fp32))
    out = probs v
Observers (`AttentionView`) see q, k, the scores and probs of every call: training losses, token importance.
Quantizing the key and the value on every call quantizes the KV cache: the grids are static, so a cached value,
already on its grid, is unchanged by quantizing it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

ATTENTION_NAME = "bench_quantized_attention"
ATTRIBUTE = "bench_attention_quant"


@dataclass
class AttentionView:
    """What one attention call computed, after quantization: q (B, heads, T, d), k (B, heads, S, d) with grouped
    key/value heads repeated, scores = q k^T * scaling before the mask (B, heads, T, S), probs after P."""

    block: int
    query: torch.Tensor
    key: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor


@dataclass
class AttentionQuant:
    """One self-attention's quantizers (x -> fake-quantized x, None: exact) and hooks. `key_mask(block, T, S)` may
    return an additive (B, 1, T, S) mask (e.g. keys of pruned tokens); `observers` get an `AttentionView`."""

    block: int
    query: Callable | None = None
    key: Callable | None = None
    value: Callable | None = None
    scores: Callable | None = None  # the softmax input, before the mask (so masked positions set no scale)
    probs: Callable | None = None
    key_mask: Callable | None = None
    observers: list[Callable] = field(default_factory=list)


def _apply(fn, x):
    return x if fn is None else fn(x)


def quantized_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention with transformers' attention-function signature (see `DecoderAdapter.use_attention`)."""
    aq: AttentionQuant | None = getattr(module, ATTRIBUTE, None)
    if aq is not None:
        query, key, value = _apply(aq.query, query), _apply(aq.key, key), _apply(aq.value, value)
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each kv head serves `groups` heads
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if aq is not None:
        scores = _apply(aq.scores, scores)
    logits = scores
    if attention_mask is not None:
        logits = logits + attention_mask[:, :, :, :key.shape[-2]]
    if aq is not None and aq.key_mask is not None:
        extra = aq.key_mask(aq.block, query.shape[-2], key.shape[-2])
        if extra is not None:
            logits = logits + extra.to(logits.dtype)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    if aq is not None:
        probs = _apply(aq.probs, probs)
        for observe in aq.observers:
            observe(AttentionView(aq.block, query, key, scores, probs))
    out = torch.matmul(F.dropout(probs, p=dropout, training=module.training), value)
    return out.transpose(1, 2).contiguous(), probs


def attach(adapter, quants: dict[int, AttentionQuant]) -> None:
    """Give block i's self-attention `quants[i]` and compute every self-attention of the adapter's model with
    `quantized_attention` from now on (blocks without an entry compute exact eager attention)."""
    for i, block in enumerate(adapter.blocks()):
        attn = adapter.attention(block)
        if i in quants:
            object.__setattr__(attn, ATTRIBUTE, quants[i])  # not a submodule: the state dict stays the model's
        elif hasattr(attn, ATTRIBUTE):
            object.__delattr__(attn, ATTRIBUTE)
    adapter.use_attention(ATTENTION_NAME, quantized_attention)


def detach(adapter) -> None:
    """Remove every block's `AttentionQuant` (the attention implementation is the caller's to restore)."""
    for block in adapter.blocks():
        attn = adapter.attention(block)
        if hasattr(attn, ATTRIBUTE):
            object.__delattr__(attn, ATTRIBUTE)


def first_token_attention(probs: torch.Tensor) -> torch.Tensor:
    """(B, T): how much each query token attends to the first (initial) token, summed over heads, from
    probs (B, heads, T, S): the token importance of the Agile-Quant reference (its default "method 2"; the EdgeQAT
    reference ranks the same column of the pre-softmax scores)."""
    return probs[..., 0].float().sum(dim=1)
