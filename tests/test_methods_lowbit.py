"""rtn and sign: stored values, bits/weight formula vs the artifact's bytes, reload reproduces the model."""

import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.methods.rtn import RTN
from bench.methods.sign import SignBinarization
from bench.quant import unpack_bits

BUDGET = Budget(name="t")


def _compress(method, lm):
    work = models.clone(lm)
    return work, method.compress(work, None, BUDGET)


def test_sign_weights_are_plus_minus_row_scale(tiny_llama):
    originals = {r.name: r.module.weight.detach().clone() for r in tiny_llama.adapter.linears()}
    work, packed = _compress(SignBinarization(), tiny_llama)
    for ref in work.adapter.linears():
        w = ref.module.weight.data
        stored = packed.layers[ref.name]
        scale = stored["scale"].float()
        assert stored["scale"].dtype == torch.float16 and scale.shape == (w.shape[0], 1)
        # exactly two values per row: +scale_r and -scale_r
        assert torch.equal(w.abs(), scale.expand_as(w))
        for row in w:
            assert row.unique().numel() <= 2
        # the sign follows the original weight; the scale is its mean |W| (rounded to fp16)
        w0 = originals[ref.name]
        assert torch.equal(torch.sign(w), torch.where(w0 >= 0, 1.0, -1.0))
        assert torch.equal(stored["scale"], w0.abs().mean(1, keepdim=True).half())
        bits = unpack_bits(stored["qweight"], 1, w.numel(), w.shape)
        assert torch.equal(bits.bool(), w > 0)


def test_sign_bits_per_weight_formula_and_artifact_bytes(tiny_llama, tmp_path):
    work, packed = _compress(SignBinarization(), tiny_llama)
    rep = packed.storage(tiny_llama)
    refs = list(tiny_llama.adapter.linears())
    expected_bytes = sum(r.module.weight.numel() // 8 + 2 * r.module.weight.shape[0] for r in refs)
    assert rep.linear_bytes == expected_bytes
    expected_bpw = sum(o * i + 16 * o for o, i in (r.module.weight.shape for r in refs)) / rep.n_weights
    assert abs(rep.bits_per_weight - expected_bpw) < 1e-12
    store = ArtifactStore(tmp_path)
    path = store.save("k", packed.tensors(tiny_llama), packed.metadata())
    size = path.stat().st_size
    payload = rep.linear_bytes + rep.other_bytes
    assert payload <= size < payload + 16_384  # safetensors header only on top of the counted bytes


def test_rtn_bits_per_weight_formula(tiny_llama):
    _, packed = _compress(RTN(bits=4, group_size=32, symmetric=False), tiny_llama)
    rep = packed.storage(tiny_llama)
    # per weight: 4 bits + per group of 32: fp16 scale + 4-bit zero
    assert abs(rep.bits_per_weight - (4 + (16 + 4) / 32)) < 1e-9


def test_rtn_values_per_group(tiny_llama):
    work, packed = _compress(RTN(bits=2, group_size=32), tiny_llama)
    for ref in work.adapter.linears():
        w = ref.module.weight.data
        for start in range(0, w.shape[1], 32):
            for row in w[:, start:start + 32]:
                assert row.unique().numel() <= 4


def test_none_keeps_weights_and_counts_16_bits(tiny_llama):
    work, packed = _compress(models_none(), tiny_llama)
    rep = packed.storage(tiny_llama)
    assert rep.bits_per_weight == 16.0
    assert torch.equal(next(work.adapter.linears()).module.weight, next(tiny_llama.adapter.linears()).module.weight)


def models_none():
    from bench.methods.none import NoCompression

    return NoCompression()


def test_corrupted_artifact_is_detected(tiny_llama, tmp_path):
    import pytest

    from bench.errors import ArtifactCorrupt

    _, packed = _compress(SignBinarization(), tiny_llama)
    store = ArtifactStore(tmp_path)
    path = store.save("k", packed.tensors(tiny_llama), packed.metadata())
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupt, match="sha256"):
        store.load("k")
