"""BinaryMoS on a tiny LLaMA: structure, stored values, bits/weight, distillation lowers its own loss,
and the artifact reload reproduces the trained model."""

import torch

from bench import models
from bench.budget import Budget
from bench.methods.binarymos import BinaryMoS, BinaryMoSLinear
from bench.quant import unpack_bits
from conftest import random_calib


def _run(lm, steps=12, lr=5e-3):
    method = BinaryMoS(n_experts=4)
    work = models.clone(lm)
    packed = method.compress(work, random_calib(8, 32), Budget(name="t", train_steps=steps, lr=lr, calib_samples=8,
                                                   calib_seqlen=32, warmup_ratio=0.0))
    return method, packed


def test_binarymos_replaces_every_block_linear_and_stores_signs(tiny_llama):
    method, packed = _run(tiny_llama)
    adapter = models.adapter_for(packed.model)
    mods = [r.module for r in adapter.linears()]
    assert len(mods) == 14 and all(isinstance(m, BinaryMoSLinear) for m in mods)
    for ref in adapter.linears():
        m, stored = ref.module, packed.layers[ref.name]
        assert m.frozen and set(m.weight.unique().tolist()) <= {-1.0, 1.0}
        bits = unpack_bits(stored["qweight"], 1, m.weight.numel(), m.weight.shape)
        assert torch.equal(bits.float() * 2 - 1, m.weight)
        assert stored["in_scale"].shape == (4, m.in_features)
        assert stored["out_scale"].shape == (4, m.out_features)
        assert stored["router"].shape == (4, m.in_features)
        assert all(t.dtype == torch.float16 for k, t in stored.items() if k != "qweight")


def test_binarymos_bits_per_weight_counts_experts_and_router(tiny_llama):
    _, packed = _run(tiny_llama, steps=1)
    rep = packed.storage(tiny_llama)
    shapes = [r.module.weight.shape for r in tiny_llama.adapter.linears()]
    expected_bits = sum(o * i + 16 * 4 * (i + o + i) for o, i in shapes)
    assert rep.linear_bytes * 8 == expected_bits
    assert abs(rep.bits_per_weight - expected_bits / sum(o * i for o, i in shapes)) < 1e-12


def test_binarymos_distillation_lowers_its_loss(tiny_llama):
    _, packed = _run(tiny_llama, steps=30)
    assert packed.training.summary()["loss_last"] < 0.9 * packed.training.summary()["loss_first"]


def test_binarymos_router_mixes_experts_per_token():
    lin = torch.nn.Linear(16, 8, bias=False)
    m = BinaryMoSLinear.from_linear(lin, 3)
    with torch.no_grad():
        m.in_scale.copy_(torch.rand(3, 16) + 0.5)  # experts now differ
    x = torch.randn(5, 16)
    p = torch.softmax(x @ m.router.weight.t(), -1)
    manual = ((x * (p @ m.in_scale)) @ torch.where(lin.weight >= 0, 1.0, -1.0).t()) * (p @ m.out_scale)
    assert torch.allclose(m(x), manual, atol=1e-6)


def test_binarymos_svid_init_is_rank1_of_abs_w():
    lin = torch.nn.Linear(32, 24, bias=False)
    m = BinaryMoSLinear.from_linear(lin, 4)
    u, s, vh = torch.linalg.svd(lin.weight.detach().abs())
    approx = torch.outer(m.out_scale[0], m.in_scale[0])
    assert torch.allclose(approx, s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5)
    assert torch.equal(m.in_scale[0], m.in_scale[3])


def test_binarymos_is_deterministic(tiny_llama):
    _, a = _run(tiny_llama, steps=4)
    _, b = _run(tiny_llama, steps=4)
    for (ka, ta), (kb, tb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(ta, tb), ka
