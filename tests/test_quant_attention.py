"""The shared quantized-attention path: without quantizers it is eager attention (LLaMA with grouped KV heads, OPT);
a key quantizer quantizes the KV cache: decoding with the cache gives the logits of the full forward."""

import pytest
import torch

from bench import models
from bench.quant import attention
from conftest import loaded_tiny

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_without_quantizers_it_is_eager_attention(arch):
    lm = loaded_tiny(arch)
    adapter = lm.adapter
    with torch.no_grad(), adapter.eager_attention():
        eager = lm.module(IDS).logits
        attention.attach(adapter, {i: attention.AttentionQuant(i) for i in range(len(adapter.blocks()))})
        ours = lm.module(IDS).logits
    assert torch.allclose(ours, eager, atol=1e-5, rtol=1e-5)


def test_quantized_key_and_value_hold_in_the_kv_cache():
    lm = loaded_tiny("llama")
    grid = lambda x: torch.round(x * 4) / 4  # noqa: E731 - a static grid: quantizing twice changes nothing
    attention.attach(lm.adapter, {i: attention.AttentionQuant(i, query=grid, key=grid, value=grid)
                                  for i in range(len(lm.adapter.blocks()))})
    with torch.no_grad():
        full = lm.module(IDS[:1]).logits
        first = lm.module(IDS[:1, :8], use_cache=True)
        step = lm.module(IDS[:1, 8:], past_key_values=first.past_key_values, use_cache=True).logits
    assert torch.allclose(step, full[:, 8:], atol=1e-5)
