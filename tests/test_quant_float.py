"""Low-bit float formats: exact value sets, exact round trips, agreement with torch's FP8 casts."""

import pytest
import torch

from bench.errors import BenchError
from bench.quant.floating import (FORMATS, FloatFormat, decode_float, float_format, quantize_float,
                                   round_to_format)


def test_fp4_e2m1_has_its_8_magnitudes_and_15_signed_values():
    assert FORMATS["fp4_e2m1"].magnitudes.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    w = torch.randn(64, 256)
    fq = quantize_float(w, FORMATS["fp4_e2m1"], group_size=32)
    q, s = fq.dequantize(), fq.scale.float().repeat_interleave(32, dim=1)
    assert fq.codes.max() <= 15 and torch.equal(decode_float(fq.codes, fq.fmt) * s, q)
    values = torch.unique(torch.round(q / s * 1e4) / 1e4)
    allowed = {v * sign for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6) for sign in (1, -1)}
    assert set(values.tolist()) <= allowed and len(allowed) == 15
    assert len(values) > 12  # random weights use nearly all of them


@pytest.mark.parametrize("name,maximum,n_mags", [("fp8_e4m3", 448, 127), ("fp8_e5m2", 57344, 124),
                                                 ("fp6_e2m3", 7.5, 32), ("fp6_e3m2", 28, 32),
                                                 ("fp4_e2m1", 6, 8), ("fp4_e3m0", 16, 8)])
def test_format_ranges_match_the_ocp_spec(name, maximum, n_mags):
    fmt = FORMATS[name]
    assert fmt.max_value == maximum and fmt.magnitudes.numel() == n_mags
    assert torch.all(fmt.magnitudes[1:] > fmt.magnitudes[:-1])


@pytest.mark.parametrize("name", list(FORMATS))
def test_representable_values_round_trip_exactly(name):
    fmt = FORMATS[name]
    x = torch.cat([fmt.magnitudes, -fmt.magnitudes]).to(torch.float32)
    q, _ = round_to_format(x, fmt)
    assert torch.equal(q, x)


@pytest.mark.parametrize("name,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_rounding_equals_torch_fp8_casts(name, dtype):
    fmt = FORMATS[name]
    x = torch.randn(20000, dtype=torch.float32) * torch.logspace(-6, 2, 20000)
    x = x[x.abs() < fmt.max_value]
    ours, _ = round_to_format(x, fmt)
    assert torch.equal(ours, x.to(dtype).to(torch.float32))


def test_saturates_instead_of_overflowing():
    q, _ = round_to_format(torch.tensor([1e9, -1e9]), FORMATS["fp4_e2m1"])
    assert q.tolist() == [6.0, -6.0]


def test_exponent_bias_shifts_the_grid():
    shifted = FloatFormat(2, 1, bias=3)  # LLM-FP4's searched bias: the same 8 codes, 4x smaller
    assert torch.equal(shifted.magnitudes * 4, FORMATS["fp4_e2m1"].magnitudes)


def test_bad_formats_are_named():
    with pytest.raises(BenchError, match="E6M3"):
        FloatFormat(6, 3)
    with pytest.raises(BenchError, match="fp4_e2m2"):
        float_format("fp4_e2m2")


def test_fp_rtn_stores_packed_codes_and_restores_bit_exactly(tiny_llama, tmp_path):
    import math

    from bench import models
    from bench.budget import Budget
    from bench.cache import ArtifactStore
    from bench.methods.fp_rtn import FloatRTN

    method = FloatRTN(format="fp6_e3m2", group_size=32)
    work = models.clone(tiny_llama)
    packed = method.compress(work, None, Budget(name="t"))
    refs = list(work.adapter.linears())
    # 6-bit codes + an fp16 scale per (row, group of 32)
    expected = sum(math.ceil(o * i * 6 / 8) + 2 * o * math.ceil(i / 32) for o, i in (r.module.weight.shape for r in refs))
    assert packed.storage(tiny_llama).linear_bytes == expected
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(tiny_llama), packed.metadata())
    restored = method.restore(models.clone(tiny_llama), *store.load("k"))
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(restored.model(ids).logits, work.module(ids).logits)
    with pytest.raises(BenchError, match="fp4_e2m1"):
        FloatRTN(format="fp5")
