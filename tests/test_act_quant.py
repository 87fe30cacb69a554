"""Activation quantization (W8A8, W4A4, FP4 activations) and SmoothQuant on tiny real-architecture models."""

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.errors import BenchError
from bench.methods.rtn import RTN
from bench.methods.smoothquant import SmoothQuant, activation_channel_max, smooth
from bench.quant.activation import ActQuantSpec, fake_quant_activations
from conftest import logits, random_calib

BUDGET = Budget(name="t")


def test_per_token_int8_keeps_each_token_on_its_own_255_level_grid():
    x = torch.randn(3, 10, 64) * torch.logspace(-2, 2, 10).view(1, 10, 1)
    q = fake_quant_activations(x, ActQuantSpec(bits=8, granularity="per_token"))
    for tok, qt in zip(x.reshape(-1, 64), q.reshape(-1, 64)):
        step = tok.abs().max() / 127
        codes = qt / step
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127.001
        assert (qt - tok).abs().max() <= step / 2 + 1e-6


def test_per_tensor_shares_one_scale_and_fp4_activations_use_15_values():
    x = torch.randn(4, 8, 32)
    q = fake_quant_activations(x, ActQuantSpec(bits=4, granularity="per_tensor"))
    assert q.unique().numel() <= 16
    f = fake_quant_activations(x, ActQuantSpec(format_name="fp4_e2m1", granularity="per_tensor"))
    assert f.unique().numel() <= 15


def test_bad_activation_settings_are_named():
    with pytest.raises(BenchError, match="per_row"):
        RTN(act_bits=8, act_granularity="per_row")
    with pytest.raises(BenchError, match="act_bits=1"):
        RTN(act_bits=1)


def test_w8a8_rtn_runs_hooked_and_restores_with_its_hooks(tiny_llama, tmp_path):
    method = RTN(bits=8, group_size=-1, symmetric=True, act_bits=8)
    work = models.clone(tiny_llama)
    packed = method.compress(work, None, BUDGET)
    assert all(str(f).endswith("+a8-per_token-dynamic") for f in packed.layer_format.values())
    ids = torch.randint(0, 256, (1, 24))
    ref, out = logits(tiny_llama, ids), logits(work, ids)
    assert 0 < (out - ref).abs().max() < 0.05 * ref.abs().max()
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(tiny_llama), packed.metadata())
    restored = method.restore(models.clone(tiny_llama), *store.load("k"))
    assert torch.equal(restored.model(ids).logits, out)  # the activation hooks came back too
    assert set(restored.layer_format.values()) == set(packed.layer_format.values())


def test_smoothing_alone_keeps_the_function(tiny_llama):
    work = models.clone(tiny_llama)
    ids = torch.randint(0, 256, (2, 32))
    before = logits(work, ids)
    smooth(work.adapter, activation_channel_max(work.adapter, random_calib().windows), alpha=0.5)
    assert torch.allclose(logits(work, ids), before, rtol=1e-2, atol=1e-2)  # exact up to fp16 norm storage
    norm = work.adapter.block_norms(work.adapter.blocks()[0])["attn"]
    assert not torch.allclose(norm.weight, torch.ones_like(norm.weight))  # the scales really moved


def _with_outlier_channels(lm):
    """Give the tiny model LLM-like activation outliers: a few input-norm channels 40x larger."""
    out = models.clone(lm)
    for b in out.adapter.blocks():
        for norm in out.adapter.block_norms(b).values():
            norm.weight.data[[3, 17, 90]] *= 40
    return out


@pytest.mark.parametrize("act_bits", [8, 6])
def test_smoothquant_beats_naive_w8a8_rtn_when_activations_have_outliers(tiny_llama, act_bits):
    base = _with_outlier_channels(tiny_llama)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    ref = logits(base, ids)
    naive = models.clone(base)
    RTN(bits=8, group_size=-1, symmetric=True, act_bits=act_bits).compress(naive, None, BUDGET)
    smoothed = models.clone(base)
    SmoothQuant(act_bits=act_bits).compress(smoothed, random_calib(), BUDGET)
    err_naive = (logits(naive, ids) - ref).pow(2).mean()
    err_smooth = (logits(smoothed, ids) - ref).pow(2).mean()
    assert err_smooth < 0.5 * err_naive, (float(err_smooth), float(err_naive))
