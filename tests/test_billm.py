"""billm: per row and column block, salient columns take four values and the rest two per group; the
stored bits reconstruct the weights exactly; bits/weight counts every bit the reconstruction needs."""

import math

import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.compress.hessian import HessianAccumulator
from bench.methods.billm import BiLLM, billm_quantize, dequantize_billm
from bench.methods.sign import SignBinarization
from bench.quant import unpack_bits
from conftest import logits, random_calib


def test_billm_block_values_and_exact_reconstruction_on_a_layer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 96, generator=g) * torch.exp(torch.randn(96, generator=g))
    w = torch.randn(40, 96, generator=g) * 0.05
    acc = HessianAccumulator(96)
    acc.add(x)
    deq, stored = billm_quantize(w, acc.H, 32, 12, 0.01)
    assert torch.equal(dequantize_billm(stored, (40, 96), 32), deq)
    salient = unpack_bits(stored["salient_cols"], 1, 96).bool()
    assert 3 <= int(salient.sum()) <= 3 * 11  # 1..11 salient columns in each of the 3 blocks
    for c0 in (0, 32, 64):
        sal = salient[c0:c0 + 32]
        for row in deq[:10, c0:c0 + 32]:
            assert row[~sal].unique().numel() <= 4  # two binarized groups: +-a_c + m_c, +-a_p + m_p
            assert row[sal].unique().numel() <= 4  # two residual orders: 4 combinations
    # the binarized layer's output error beats sign binarization (per-row mean |w|) by far
    sign = w.abs().mean(dim=1, keepdim=True) * torch.where(w >= 0, 1.0, -1.0)
    assert (x @ (deq - w).T).pow(2).mean() < 0.5 * (x @ (sign - w).T).pow(2).mean()


def test_billm_on_a_model_reloads_bit_exactly_and_counts_its_bits(tiny_llama, tiny_opt, tmp_path):
    for lm in (tiny_llama, tiny_opt):
        method = BiLLM(block_size=64, max_salient=10)
        work = models.clone(lm)
        packed = method.compress(work, random_calib(), Budget(name="t"))
        refs = list(work.adapter.linears())
        assert set(packed.layers) == {r.name for r in refs}
        expected = 0
        for r in refs:
            o, i = r.module.weight.shape
            s = packed.layers[r.name]
            n_sal = int(unpack_bits(s["salient_cols"], 1, i).sum())
            signs = math.ceil(o * i / 8) + math.ceil(o * n_sal / 8)
            masks = math.ceil(i / 8) + math.ceil(o * (i - n_sal) / 8)
            params = o * math.ceil(i / 64) * 8 * 2  # 8 fp16 per row and block of 64 columns
            expected += signs + masks + params + (2 * o if r.module.bias is not None else 0)
        storage = packed.storage(lm)
        assert storage.linear_bytes == expected
        assert 2.0 < storage.bits_per_weight < 4.5  # signs + split bit + salient bits + 8 fp16 per row-block
        store = ArtifactStore(tmp_path / lm.spec.name)
        store.save("k", packed.tensors(lm), packed.metadata())
        restored = method.restore(models.clone(lm), *store.load("k"))
        ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
        assert torch.equal(restored.model(ids).logits, logits(work, ids))
        # billm < sign on the model output
        signed = models.clone(lm)
        SignBinarization().compress(signed, None, Budget(name="t"))
        ref = logits(lm, ids)
        assert (logits(work, ids) - ref).pow(2).mean() < (logits(signed, ids) - ref).pow(2).mean()
