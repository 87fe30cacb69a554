"""abq: the five-level 2-bit grid and its packing, learnable clipping, block training that lowers its own
loss, exact storage accounting and a bit-exact artifact reload, on LLaMA and OPT."""

import math

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.errors import BenchError
from bench.methods.abq import ABQ, lwc_quantize
from bench.quant import IntQuantized, pack_levels, unpack_levels
from bench.methods.rtn import RTN
from conftest import loaded_tiny, logits, random_calib


@pytest.mark.parametrize("levels,bits_each", [(3, 8 / 5), (5, 7 / 3), (8, 3), (16, 4)])
def test_level_codes_pack_to_their_stated_size_and_round_trip(levels, bits_each):
    codes = torch.randint(0, levels, (37, 41), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    packed = pack_levels(codes, levels)
    n = codes.numel()
    per, bits = {3: (5, 8), 5: (3, 7)}.get(levels, (1, bits_each))
    expected = math.ceil(math.ceil(n / per) * bits / 8)
    assert packed.numel() == expected
    assert torch.equal(unpack_levels(packed, levels, n, codes.shape), codes)


def test_two_bit_balanced_grid_has_five_levels_and_clipping_narrows_it():
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    deq, codes, scale, zero = lwc_quantize(w, 5, 32)
    assert int(codes.max()) == 4 and int(codes.min()) == 0
    for row in range(16):
        for gi in range(3):
            assert deq[row, gi * 32:(gi + 1) * 32].unique().numel() <= 5
    assert torch.equal(IntQuantized(codes.to(torch.uint8), scale, zero, 2, 32, False).dequantize(), deq)
    # clipping factors sigmoid(u) < 1 shrink each group's range: smaller scales
    _, _, clipped, _ = lwc_quantize(w, 5, 32, torch.full((16, 3), -1.0), torch.full((16, 3), -1.0))
    assert torch.all(clipped < scale)
    # the straight-through estimator lets the clipping logits learn
    up = torch.zeros(16, 3, requires_grad=True)
    low = torch.zeros(16, 3, requires_grad=True)
    (lwc_quantize(w, 5, 32, up, low)[0] - w).pow(2).sum().backward()
    assert up.grad.abs().sum() > 0 and low.grad.abs().sum() > 0


def test_abq_trains_every_block_lowers_its_loss_and_reloads_bit_exactly(tiny_llama, tmp_path):
    method = ABQ(bits=2, group_size=32)
    work = models.clone(tiny_llama)
    packed = method.compress(work, random_calib(), Budget(name="t", train_steps=12))
    refs = list(work.adapter.linears())
    assert set(packed.layers) == {r.name for r in refs}
    blocks = packed.training.stages  # one stage per block, in one group (the same windows pass every block)
    assert [s.name for s in blocks] == ["abq block 0", "abq block 1"] and {s.group for s in blocks} == {"abq blocks"}
    assert all(s.loss_last < s.loss_first for s in blocks), [(s.loss_first, s.loss_last) for s in blocks]
    assert packed.training.summary()["steps"] == 24 and packed.training.summary()["samples_seen"] == 12
    for r in refs:  # at most 5 values per (row, group of 32)
        w = r.module.weight.data
        for row in w[:8]:
            for gi in range(0, w.shape[1], 32):
                assert row[gi:gi + 32].unique().numel() <= 5
    # bytes: codes three per 7 bits; per (row, group) an fp16 scale and a zero code (3 bits, also base 5)
    expected = 0
    for o, i in (r.module.weight.shape for r in refs):
        groups = o * math.ceil(i / 32)
        expected += math.ceil(math.ceil(o * i / 3) * 7 / 8) + 2 * groups + math.ceil(math.ceil(groups / 3) * 7 / 8)
    assert packed.storage(tiny_llama).linear_bytes == expected
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(tiny_llama), packed.metadata())
    restored = method.restore(models.clone(tiny_llama), *store.load("k"))
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(restored.model(ids).logits, logits(work, ids))


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_abq_w4a4_tames_outlier_channels_that_break_rtn(arch):
    """Real LLMs have a few activation channels far larger than the rest; here two norm channels are scaled
    by 30. The equivalent transformation moves them into the weights, so W4A4 abq beats W4A4 rtn."""
    lm = loaded_tiny(arch)
    with torch.no_grad():
        for block in lm.adapter.blocks():
            for norm in lm.adapter.block_norms(block).values():
                norm.weight[[3, 70]] *= 30
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    ref = logits(lm, ids)
    errors = {}
    for method in (RTN(bits=4, group_size=-1, act_bits=4), ABQ(bits=4, act_bits=4)):
        work = models.clone(lm)
        packed = method.compress(work, random_calib(), Budget(name="t", train_steps=12))
        assert packed.info["activations"] == "a4-per_token-dynamic"
        out = logits(work, ids)
        assert torch.isfinite(out).all()
        errors[method.name] = float((out - ref).pow(2).mean())
    assert errors["abq"] < 0.5 * errors["rtn"], errors


def test_abq_rejects_bad_settings():
    for kw in ({"bits": 1}, {"bits": 9}, {"alpha": 1.5}, {"lwc_lr": 0.0}, {"act_bits": 1}):
        with pytest.raises(BenchError):
            ABQ(**kw)
