import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.errors import ConfigError
from bench.quant import pack_bits, packed_nbytes, quantize_rtn, unpack_bits


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 300), seed=st.integers(0, 10_000))
def test_pack_unpack_roundtrip_exact(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_rtn_at_most_2_pow_bits_values_per_group(bits, symmetric, group):
    w = torch.randn(16, 576)
    q = quantize_rtn(w, bits, group, symmetric)
    wq = q.dequantize()
    g = 576 if group == -1 else group
    for start in range(0, 576, g):
        block = wq[:, start:start + g]
        for row in block:
            assert row.unique().numel() <= 2**bits
    # error is bounded by half a step per group
    step = q.scale.float().repeat_interleave(g, dim=1)[:, :576]
    assert ((w - wq).abs() <= step * 0.5 + 1e-6).float().mean() > 0.99


def test_rtn_ragged_last_group_follows_gptq():
    # 576 columns with g128 = 4 full groups + one group of 64 (GPTQ reference semantics)
    q = quantize_rtn(torch.randn(4, 576), 4, 128)
    assert q.scale.shape == (4, 5)
    assert q.zero.shape == (4, 5)


def test_rtn_roundtrip_exact_on_representable_values():
    scale, bits = 0.125, 4
    codes = torch.randint(0, 16, (8, 64))
    codes[:, 0], codes[:, 1] = 0, 15  # min and max present so the grid is recovered exactly
    w = (codes.float() - 8) * scale
    q = quantize_rtn(w, bits, -1, symmetric=False)
    assert torch.equal(q.dequantize(), w)


@pytest.mark.parametrize("bad", [0, 1, 9, 16])
def test_rtn_bits_out_of_range(bad):
    with pytest.raises(ConfigError, match="out of range"):
        quantize_rtn(torch.randn(4, 64), bad, 32)


def test_group_larger_than_layer_is_a_config_error():
    with pytest.raises(ConfigError, match="group_size=1024"):
        quantize_rtn(torch.randn(4, 576), 4, 1024, layer="q_proj")


def test_clipped_sign_forward_and_its_gradient_window():
    from bench.quant.binary import clipped_sign

    w = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    out = clipped_sign(w)
    assert out.tolist() == [-1, -1, -1, 1, 1, 1, 1]  # sign(0) = +1: every stored bit means +-1
    out.sum().backward()
    assert w.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]  # |w| <= 1 passes
    w.grad = None
    clipped_sign(w, inclusive=False).sum().backward()
    assert w.grad.tolist() == [0, 0, 1, 1, 1, 0, 0]  # BinaryMoS's reference: |w| < 1
