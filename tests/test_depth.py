"""Depth pruning (sleb, shortgpt) on 6-block tiny LLaMA and OPT: how many and which blocks go, the shallower
model still generates with a KV cache, bits/weight falls with depth, exact reload from the artifact."""

import json

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.errors import BenchError
from bench.methods.shortgpt import ShortGPT
from bench.methods.sleb import SLEB
from conftest import loaded_tiny, logits, random_calib


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_depth_pruning_removes_blocks_and_the_model_still_works(arch, tmp_path):
    lm = loaded_tiny(arch, layers=6)
    for method in (SLEB(n_blocks=2, search_windows=4), ShortGPT(ratio=0.34)):
        work = models.clone(lm)
        packed = method.compress(work, random_calib(), Budget(name="t"))
        removed = json.loads(packed.extra_metadata["removed_blocks"])
        assert len(removed) == 2 and len(work.adapter.blocks()) == 4
        assert work.module.config.num_hidden_layers == 4
        if method.name == "sleb":
            assert 0 not in removed and 5 not in removed  # first and last block are kept
        else:
            bi = packed.per_layer[0]["block_influence"]
            assert sorted(removed) == sorted(sorted(range(6), key=lambda b: bi[b])[:2])
        ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
        out = work.module.generate(ids, max_new_tokens=4, do_sample=False)  # KV cache over renumbered blocks
        assert out.shape == (1, 16)
        full = sum(2 * (r.module.weight.numel() + (r.module.bias.numel() if r.module.bias is not None else 0))
                   for r in lm.adapter.linears())  # fp16 weights and biases of all 6 blocks
        assert packed.storage(lm).linear_bytes * 6 == full * 4  # bits/weight falls with depth
        store = ArtifactStore(tmp_path / f"{arch}-{method.name}")
        store.save("k", packed.tensors(lm), packed.metadata())
        restored = method.restore(models.clone(lm), *store.load("k"))
        assert torch.equal(restored.model(ids).logits, logits(work, ids))


def test_depth_pruning_rejects_impossible_counts():
    lm = loaded_tiny("llama", layers=3)
    with pytest.raises(BenchError):
        ShortGPT(n_blocks=2).compress(models.clone(lm), random_calib(), Budget(name="t"))
    with pytest.raises(BenchError):
        SLEB(ratio=0.95)
