"""BCT (methods/bct.py): the blockwise quantizer's levels and error, every quantized operator of a tiny LLaMA and OPT
taking at most 2^bits values per block, the artifact reloading bit for bit with bits per weight counted from its
bytes (the tied head stored once, as the quantized embedding), 8-bit perplexity close to fp32, the config errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose, loaded_tiny

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.errors import ConfigError
from bench.methods.bct import BCT, bct_attention
from bench.quant.attention import ATTRIBUTE, quantized_attention
from bench.quant.activation import fake_quant_blocks
from bench.runner import build


def block_view(t: torch.Tensor, block: int) -> list[torch.Tensor]:
    """The blocks of `block` consecutive elements of the last dimension (the last one shorter)."""
    flat = t.detach().float().reshape(-1, t.shape[-1])
    return [flat[r, i:i + block] for r in range(flat.shape[0]) for i in range(0, t.shape[-1], block)]


def max_levels_per_block(t: torch.Tensor, block: int) -> int:
    return max(len(torch.unique(b)) for b in block_view(t, block))


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_blockwise_quantizer_keeps_each_block_on_its_own_absmax_grid(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 200, generator=g) * torch.logspace(-3, 3, 200)  # blocks of very different ranges
    q = fake_quant_blocks(x, bits, 64)  # 64, 64, 64 and a last block of 8
    qmax = 2 ** (bits - 1) - 1
    for xb, qb in zip(block_view(x, 64), block_view(q, 64)):
        scale = xb.abs().max() / qmax
        codes = qb / scale
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= qmax + 1e-3
        assert len(torch.unique(qb)) <= 2**bits - 1
        assert (qb - xb).abs().max() <= scale / 2 * (1 + 1e-5)  # round to nearest, nothing clipped
        assert torch.isclose(qb.abs().max(), xb.abs().max())  # the block's absmax is on its grid
    p = torch.softmax(torch.randn(4, 100, generator=g), dim=-1)
    pu = fake_quant_blocks(p, bits, 32, unsigned=True)
    assert (pu >= 0).all() and max_levels_per_block(pu, 32) <= 2**bits
    assert max_levels_per_block(pu, 32) > 2 ** (bits - 1) or bits == 8  # the unsigned grid uses its top half


def test_a_dimension_shorter_than_the_block_is_one_block():
    x = torch.randn(5, 32)
    assert torch.equal(fake_quant_blocks(x, 4, 64), fake_quant_blocks(x, 4, 32))


def _operator_outputs(lm, ids):
    """Outputs of every hooked operator of a BCT model, recorded by hooks registered after BCT's (which run
    first), plus the attention probabilities."""
    adapter, seen = lm.adapter, {}

    def keep(name):
        return lambda _m, _a, out: seen.setdefault(name, []).append(out[0] if isinstance(out, tuple) else out)

    for ref in adapter.linears():
        ref.module.register_forward_pre_hook(
            lambda _m, a, name=f"{ref.name}.input": seen.setdefault(name, []).append(a[0]))
        ref.module.register_forward_hook(keep(f"{ref.name}.output"))
    for i, block in enumerate(adapter.blocks()):
        for n, norm in adapter.block_norms(block).items():
            norm.register_forward_hook(keep(f"{i}.{n}_norm"))
        adapter.mlp_activation(block).register_forward_hook(keep(f"{i}.activation"))
        block.register_forward_hook(keep(f"{i}.block"))
    adapter.final_norm().register_forward_hook(keep("final_norm"))
    for j, emb in enumerate(adapter.embeddings()):
        emb.register_forward_hook(keep(f"embedding{j}"))
    with torch.no_grad():
        out = lm.module(ids, output_attentions=True)
    return seen, out.attentions


@pytest.mark.parametrize("arch", ("llama", "opt"))
def test_every_quantized_operator_takes_at_most_2_to_the_bits_values_per_block(arch):
    bits, block = 3, 32
    base = loaded_tiny(arch)
    lm = models.clone(base)
    packed = BCT(bits=4, act_bits=bits, block_size=block).compress(lm, None, Budget(name="t"))
    seen, attentions = _operator_outputs(lm, torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0)))
    n_linears = sum(1 for _ in lm.adapter.linears())
    assert sum(k.endswith((".input", ".output")) for k in seen) == 2 * n_linears
    assert any("activation" in k for k in seen) and any("norm" in k for k in seen)
    for name, outs in seen.items():
        for t in outs:
            assert max_levels_per_block(t, block) <= 2**bits - 1, name  # signed symmetric: 2^bits - 1 levels
    assert len(attentions) == len(lm.adapter.blocks())
    for probs in attentions:
        assert (probs >= 0).all() and max_levels_per_block(probs, block) <= 2**bits  # unsigned softmax output
    rows = {r["operator"]: r for r in packed.per_layer if "operator" in r}
    act = f"a{bits}-per_block{block}-dynamic"
    assert rows["softmax.output"]["format"] == f"{act}-unsigned" and rows["norm.output"]["format"] == act
    assert rows["linear.input"]["sites"] == n_linears
    relu_or_silu = "ReLU" if arch == "opt" else "SiLU"
    assert any(k.startswith("mlp_activation.output") and relu_or_silu in k for k in rows)
    # the weights: every block linear and embedding row takes at most 2^bits values per block of input columns
    for ref in [*lm.adapter.linears(), *BCT.weight_tables(lm)]:
        assert max_levels_per_block(ref.module.weight, block) <= 2**4, ref.name


def test_attention_quantizes_scores_before_the_mask_and_softmax_output_unsigned():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 10, 16, generator=g) for _ in range(3))
    mask = torch.triu(torch.full((10, 10), float("-inf")), 1)[None, None]
    module = torch.nn.Module().eval()
    setattr(module, ATTRIBUTE, bct_attention(0, 4, 8))
    out, probs = quantized_attention(module, q, k[:, :2], v[:, :2], mask, 0.25)  # 2 kv heads, grouped
    assert out.shape == (1, 10, 4, 16) and torch.isfinite(out).all()
    assert torch.equal(probs.triu(1), torch.zeros_like(probs))  # the mask still zeroes the future exactly
    assert max_levels_per_block(probs, 8) <= 16 and torch.allclose(probs.sum(-1), torch.ones(1, 4, 10), atol=0.1)


def test_artifact_reloads_bit_exactly_and_bits_per_weight_come_from_its_bytes(tmp_path):
    base = loaded_tiny("llama")  # hidden 128, MLP 256, vocab 256, tied head
    method = BCT(bits=4, act_bits=8, block_size=64)
    packed = method.compress(models.clone(base), None, Budget(name="t"))
    tensors = packed.tensors(base)
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" not in tensors  # stored once, packed
    assert tensors["model.embed_tokens.qweight"].numel() == 256 * 128 * 4 // 8
    store = ArtifactStore(tmp_path)
    store.save("k", tensors, packed.metadata())
    restored = method.restore(models.clone(base), *store.load("k"))
    a, b = packed.model.state_dict(), restored.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(packed.model(ids).logits, restored.model(ids).logits)
    storage = packed.storage(base)
    # 4-bit codes + one fp16 scale per 64 columns, every width a multiple of 64: exactly 4.25 bits per weight
    assert storage.linear_bytes == sum(r.module.weight.numel() for r in base.adapter.linears()) * 4.25 / 8
    assert storage.bits_per_weight == 4.25 and packed.info["embedding_bits_per_weight"] == 4.25
    assert restored.info["embedding_bits_per_weight"] == 4.25
    on_disk = store.paths("k")[0].stat().st_size
    assert on_disk > storage.linear_bytes + 256 * 128 * 4.25 / 8  # header + norms on top of the packed codes


def _perplexity(module, ids) -> float:
    with torch.no_grad():
        logits = module(ids).logits[0, :-1].float()
    return math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())


def test_8bit_perplexity_stays_within_half_a_percent_of_fp32_and_fewer_bits_cost_more():
    base = loaded_tiny("llama")
    with torch.no_grad():  # a sharper random model, so that quantization noise shows in its perplexity
        for ref in base.adapter.linears():
            ref.module.weight.mul_(8)
    ids = torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(5))
    ref_ppl = _perplexity(base.module, ids)
    ppl = {}
    for bits in (8, 3):
        lm = models.clone(base)
        BCT(bits=bits, act_bits=bits, block_size=64).compress(lm, None, Budget(name="t"))
        ppl[bits] = _perplexity(lm.module, ids)
    assert abs(ppl[8] / ref_ppl - 1) < 0.005, (ref_ppl, ppl)
    assert abs(ppl[3] / ref_ppl - 1) > abs(ppl[8] / ref_ppl - 1)


@pytest.mark.parametrize("override, problem", [
    ("method.bits=9", "method.bits=9 is out of range"), ("method.bits=1", "method.bits=1 is out of range"),
    ("method.act_bits=16", "method.act_bits=16 is out of range"),
    ("method.block_size=0", "method.block_size=0 is not a block size")])
def test_a_bad_setting_raises_one_readable_config_error(override, problem):
    with pytest.raises(ConfigError) as e:
        build(compose("method=bct", override).method, "method")
    assert str(e.value).startswith(problem) and "\n" not in str(e.value)
