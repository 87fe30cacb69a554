"""llm_fp4: the real-bias FP quantizer, the searched formats and biases, storage and restore."""

import math

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.methods.llm_fp4 import LLMFP4, act_shifts, default_bias, formats_for, initial_bias
from bench.quant.floating import FloatFormat, fake_quant_float_bias, round_to_format
from conftest import logits, random_calib


@pytest.mark.parametrize("e,m", [(2, 1), (3, 0), (1, 2), (4, 3)])
def test_real_bias_quantizer_is_a_power_of_two_rescaling_of_the_format(e, m):
    fmt = FloatFormat(e, m)
    x = torch.randn(4096) * 3
    # integer default bias: exactly the format's round-to-nearest (ties to even)
    assert torch.equal(fake_quant_float_bias(x, e, m, default_bias(e)), round_to_format(x, fmt)[0])
    # any real bias b: s * format(x / s) with s = 2^(b0 - b)
    for b in (-1.3, 0.4, 2.7):
        s = 2.0 ** (default_bias(e) - b)
        assert torch.allclose(fake_quant_float_bias(x, e, m, b), round_to_format(x / s, fmt)[0] * s, rtol=1e-6)


def test_initial_bias_puts_the_largest_value_at_maxval():
    for e, m in formats_for(4):
        b = initial_bias(torch.tensor([0.37]), e, m)
        assert math.isclose(float(fake_quant_float_bias(torch.tensor([10.0]), e, m, b)), 0.37, rel_tol=1e-5)
    assert formats_for(4) == [(3, 0), (2, 1), (1, 2)]
    assert formats_for(8) == [(5, 2), (4, 3), (3, 4), (2, 5), (1, 6)]  # the reference's 8-bit candidates


def test_preshifted_activation_bias_offsets_are_integers_in_the_exponent_range():
    ch = torch.tensor([-3.2, -1.0, 0.4, 2.6, 9.0])
    k = act_shifts(ch, torch.tensor(-3.4), e=2)
    assert torch.equal(k, torch.tensor([0.0, 2.0, 3.0, 3.0, 3.0]))  # clamp(round(b_c), -3, 0) + 3


def _heavy_tailed_layer(seed=0, n=512, d=96, out=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, [5, 40]] *= 25  # outlier channels, as in LLM activations
    w = torch.randn(out, d, generator=g) * 0.05
    return w, x


def test_search_lowers_the_layer_output_error_versus_minmax():
    w, x = _heavy_tailed_layer()
    y = x @ w.T
    method = LLMFP4(w_bits=4, a_bits=4, search_rounds=2, grid=60)
    (e, m), bias, act = method.search_layer(w, x)
    searched = (act.quantize(x) @ fake_quant_float_bias(w, e, m, bias.unsqueeze(1)).T - y).pow(2).mean()
    # min/max baseline: E2M1 weights per row at max |w|, activations per tensor at max |x|
    wq = fake_quant_float_bias(w, 2, 1, initial_bias(w.abs().amax(dim=1), 2, 1).unsqueeze(1))
    xq = fake_quant_float_bias(x, 2, 1, initial_bias(x.abs().amax(), 2, 1))
    minmax = (xq @ wq.T - y).pow(2).mean()
    assert searched < 0.5 * minmax, (float(searched), float(minmax))
    assert act.shift.max() > 0  # the small channels were shifted up


def test_llm_fp4_weights_take_only_format_values_and_restore_bit_exactly(tiny_llama, tmp_path):
    method = LLMFP4(w_bits=4, a_bits=4, grid=20, search_rounds=1, search_tokens=256)
    work = models.clone(tiny_llama)
    packed = method.compress(work, random_calib(), Budget(name="t"))
    refs = list(work.adapter.linears())
    assert set(packed.layers) == {r.name for r in refs}
    for r in refs:
        stored = packed.layers[r.name]
        e, m = (int(v) for v in stored["w_format"])
        mags = FloatFormat(e, m).magnitudes.to(torch.float32)
        w = r.module.weight.data
        scaled = w / stored["scale"].to(torch.float32)
        for row in scaled[:8]:  # every row: signed format values x its scale, at most 2^4 - 1 distinct
            assert row.unique().numel() <= 15
            assert torch.isin(row.abs(), mags).all()
    # bytes: 4-bit codes + fp16 scale per row + 2 format bytes; activations: fp32 t + a shift per input + 2
    expected = sum(math.ceil(o * i / 2) + 2 * o + 2 + 4 + i + 2 for o, i in (r.module.weight.shape for r in refs))
    assert packed.storage(tiny_llama).linear_bytes == expected
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(tiny_llama), packed.metadata())
    restored = method.restore(models.clone(tiny_llama), *store.load("k"))
    assert torch.equal(restored.model(ids).logits, logits(work, ids))  # weights and activation hooks alike
    # the static activation quantizer is active: removing nothing else, fp inputs would change the output
    assert not torch.equal(logits(work, ids), logits(tiny_llama, ids))


def test_llm_fp4_rejects_bad_settings():
    from bench.errors import BenchError

    for kw in ({"w_bits": 2}, {"a_bits": 9}, {"alpha": 1.5, "beta": 1.2}, {"grid": 0}):
        with pytest.raises(BenchError):
            LLMFP4(**kw)
