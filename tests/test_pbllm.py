"""pbllm: exactly the requested fraction is salient, binarized weights take two values per row, salient ones
lie on the row's 8-bit grid; bits/weight counts bitmap, signs, codes and scales; exact reload."""

import math

import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.compress.hessian import HessianAccumulator
from bench.methods.pbllm import PBLLM, pbllm_quantize
from bench.quant import unpack_bits
from conftest import logits, random_calib


def test_pbllm_layer_masks_values_and_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 96, generator=g) * torch.exp(torch.randn(96, generator=g))
    w = torch.randn(40, 96, generator=g) * 0.05
    acc = HessianAccumulator(96)
    acc.add(x)
    deq, stored, _ = pbllm_quantize(w, acc.H, 0.1, 8, -1, 0.01)
    salient = unpack_bits(stored["salient"], 1, 40 * 96, (40, 96)).bool()
    assert int(salient.sum()) == round(0.1 * 40 * 96)
    for r in range(40):
        assert deq[r][~salient[r]].unique().numel() <= 2
        scale = stored["scale"][r].float()
        codes = deq[r][salient[r]] / scale
        assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the row's integer grid
    err = (x @ (deq - w).T).pow(2).mean()
    none_salient = pbllm_quantize(w, acc.H, 0.0, 8, -1, 0.01)[0]
    assert err < 0.8 * (x @ (none_salient - w).T).pow(2).mean()  # keeping 10% at 8 bits helps


def test_pbllm_on_models_counts_bits_and_reloads_exactly(tiny_llama, tiny_opt, tmp_path):
    for lm in (tiny_llama, tiny_opt):
        method = PBLLM()
        work = models.clone(lm)
        packed = method.compress(work, random_calib(), Budget(name="t"))
        expected = 0
        for r in work.adapter.linears():
            o, i = r.module.weight.shape
            n_sal = round(0.1 * o * i)
            expected += (math.ceil(o * i / 8) + math.ceil((o * i - n_sal) / 8) + n_sal + o * 2 * 2 + 2 * o + o
                         + (2 * o if r.module.bias is not None else 0))
        assert packed.storage(lm).linear_bytes == expected
        store = ArtifactStore(tmp_path / lm.spec.name)
        store.save("k", packed.tensors(lm), packed.metadata())
        restored = method.restore(models.clone(lm), *store.load("k"))
        ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
        assert torch.equal(restored.model(ids).logits, logits(work, ids))
