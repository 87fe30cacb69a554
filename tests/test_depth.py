"""Depth pruning (sleb, shortgpt) on 6-block tiny LLaMA and OPT: how many and which blocks go, the shallower
model still generates with a KV cache, bits/weight falls with depth, exact reload from the artifact."""

import json

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.errors import BenchError
from bench.methods.foldgpt import FoldGPT
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


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_foldgpt_removes_the_smallest_gates_shares_weights_and_reloads(arch, tmp_path):
    lm = loaded_tiny(arch, layers=6)
    work = models.clone(lm)
    method = FoldGPT(n_blocks=1, n_shared=2)
    packed = method.compress(work, random_calib(), Budget(name="t", train_steps=12, batch_size=2))
    gates = packed.per_layer[0]["gates"]
    removed = json.loads(packed.extra_metadata["removed_blocks"])
    parents = {int(c): p for c, p in json.loads(packed.extra_metadata["shared_blocks"]).items()}
    assert all(0.0 <= g <= 1.0 for g in gates) and len(set(gates)) > 1  # the gates trained, within bounds
    assert removed == [min(range(6), key=lambda b: gates[b])]
    assert len(work.adapter.blocks()) == 5 and len(parents) == 2 and 0 not in parents
    blocks = work.adapter.blocks()
    for child, parent in parents.items():
        assert parent < child and parent not in parents
        for role, linear in work.adapter.block_linears(blocks[child]).items():
            assert linear.weight is work.adapter.block_linears(blocks[parent])[role].weight
    gate_stage, norm_stage = packed.training.stages  # foldgpt trains two stages, both recorded
    assert norm_stage.name == "foldgpt norm recovery" and norm_stage.loss_last < norm_stage.loss_first  # lowered
    full = sum(2 * (r.module.weight.numel() + (r.module.bias.numel() if r.module.bias is not None else 0))
               for r in lm.adapter.linears())
    assert packed.storage(lm).linear_bytes * 6 == full * 3  # 6 blocks -> 5 run, 3 stored
    store = ArtifactStore(tmp_path / arch)
    store.save("k", packed.tensors(lm), packed.metadata())
    restored = method.restore(models.clone(lm), *store.load("k"))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(restored.model(ids).logits, logits(work, ids))
    assert work.module.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 16)


def test_foldgpt_rejects_sharing_every_block():
    with pytest.raises(BenchError, match="at least one block must keep its own weights"):
        FoldGPT(n_blocks=2, n_shared=4).compress(models.clone(loaded_tiny("llama", layers=6)), random_calib(),
                                                 Budget(name="t", train_steps=1))
