"""OneBit on tiny LLaMA and OPT: SVID initialisation, signs and value vectors stored, bits/weight, the
distillation lowers its own loss, exact artifact reload."""

import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.methods.onebit import OneBit, OneBitLinear
from bench.quant import unpack_bits
from conftest import random_calib


def _run(lm, steps=12, lr=5e-3):
    method = OneBit()
    work = models.clone(lm)
    budget = Budget(name="t", train_steps=steps, lr=lr, calib_samples=8, calib_seqlen=32, warmup_ratio=0.0)
    return method, method.compress(work, random_calib(8, 32), budget)


def test_svid_init_is_the_nonnegative_rank1_of_abs_w_and_latent_signs():
    lin = torch.nn.Linear(32, 24)
    m = OneBitLinear.from_linear(lin)
    u, s, vh = torch.linalg.svd(lin.weight.detach().abs())
    assert torch.allclose(torch.outer(m.out_scale, m.in_factor), s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5)
    assert (m.in_factor >= 0).all() and (m.out_scale >= 0).all()  # Perron-Frobenius: the NMF optimum
    assert torch.equal(torch.sign(m.weight), torch.where(lin.weight >= 0, 1.0, -1.0))
    assert m.weight.abs().max() == 0.01
    x = torch.randn(5, 32)
    y = ((x * m.in_factor) @ torch.sign(m.weight).t()) * m.out_scale
    assert torch.allclose(m(x), torch.nn.functional.layer_norm(y, (24,)) + lin.bias, atol=1e-5)


def test_onebit_trains_stores_signs_and_reloads(tiny_llama, tiny_opt, tmp_path):
    for lm in (tiny_llama, tiny_opt):
        method, packed = _run(lm, steps=30)
        assert packed.training.summary()["loss_last"] < 0.9 * packed.training.summary()["loss_first"]
        adapter = models.adapter_for(packed.model)
        n_weights = 0
        expected_bytes = 0
        for ref in adapter.linears():
            m, stored = ref.module, packed.layers[ref.name]
            assert isinstance(m, OneBitLinear) and m.frozen
            assert set(m.weight.unique().tolist()) <= {-1.0, 1.0}
            bits = unpack_bits(stored["qweight"], 1, m.weight.numel(), m.weight.shape)
            assert torch.equal(bits.float() * 2 - 1, m.weight)
            n_weights += m.weight.numel()
            expected_bytes += m.weight.numel() // 8 + 2 * (m.in_features + m.out_features)
            expected_bytes += 2 * m.out_features if m.bias is not None else 0
        assert packed.storage(lm).linear_bytes == expected_bytes
        store = ArtifactStore(tmp_path / lm.spec.name)
        store.save("k", packed.tensors(lm), packed.metadata())
        restored = method.restore(models.clone(lm), *store.load("k"))
        ids = torch.randint(0, 256, (1, 16))
        with torch.no_grad():
            assert torch.equal(packed.model(ids).logits, restored.model(ids).logits)
