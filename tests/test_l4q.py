"""l4q: trains LoRA and the grid jointly, lowers its own loss, ends as a plain integer artifact (same bytes
as rtn at the same bits and groups), at most 2^bits values per group, exact reload."""

import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.compress.distill import kd_logits
from bench.methods.l4q import L4Q
from bench.methods.rtn import RTN
from conftest import logits, random_calib


def test_l4q_trains_merges_and_stores_an_int_grid(tiny_llama, tmp_path):
    budget = Budget(name="t", train_steps=40, lr=2e-4, calib_samples=8, calib_seqlen=32, warmup_ratio=0.0)
    method = L4Q(bits=3, group_size=32, rank=8, alpha=16)
    work = models.clone(tiny_llama)
    packed = method.compress(work, random_calib(8, 32), budget)
    assert packed.training.summary()["loss_last"] < 0.9 * packed.training.summary()["loss_first"]
    for ref in work.adapter.linears():
        assert type(ref.module) is torch.nn.Linear  # no adapter left: merged and quantized
        w = ref.module.weight.data
        for row in w[:6]:
            for c in range(0, w.shape[1], 32):
                assert row[c:c + 32].unique().numel() <= 8
    rtn = RTN(bits=3, group_size=32).compress(models.clone(tiny_llama), None, budget)
    assert packed.storage(tiny_llama).linear_bytes == rtn.storage(tiny_llama).linear_bytes
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))  # held-out windows
    teacher = logits(tiny_llama, ids)
    assert kd_logits(logits(work, ids), teacher) < kd_logits(rtn.model(ids).logits, teacher)
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(tiny_llama), packed.metadata())
    restored = method.restore(models.clone(tiny_llama), *store.load("k"))
    assert torch.equal(restored.model(ids).logits, logits(work, ids))
