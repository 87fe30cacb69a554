"""magnitude, wanda, sparsegpt: exact sparsity and N:M patterns, stored sparse bytes, reloads, and the
calibrated methods beat magnitude on the layer output."""

import math

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.compress.hessian import HessianAccumulator
from bench.compress.sparsity import Pattern, keep_top
from bench.errors import BenchError
from bench.methods.magnitude import MagnitudePruning
from bench.methods.sparsegpt import SparseGPT, sparsegpt_prune
from bench.methods.wanda import Wanda
from conftest import logits, random_calib


def test_patterns_and_masks():
    assert Pattern.parse("2:4", 0.9).sparsity == 0.5
    for bad in ("3:5", "4:2", "x"):
        with pytest.raises(BenchError):
            Pattern.parse(bad, 0.5)
    score = torch.rand(8, 64, generator=torch.Generator().manual_seed(0))
    nm = keep_top(score, Pattern.parse("2:4", 0))
    assert torch.all(nm.reshape(8, 16, 4).sum(-1) == 2)
    rows = keep_top(score, Pattern.parse("unstructured", 0.5), per_row=True)
    assert torch.all(rows.sum(1) == 32)


def _layer(seed=0, n=2048, d=128, out=64):
    """Correlated input features of unequal scale (what lets SparseGPT's reconstruction help)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + torch.randn(d, d, generator=g) / d**0.5
    x = (torch.randn(n, d, generator=g) @ mix) * torch.exp(0.5 * torch.randn(d, generator=g))
    w = torch.randn(out, d, generator=g) * 0.05
    acc = HessianAccumulator(d)
    acc.add(x)
    return w, x, acc.H


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_prunes_exactly_and_beats_magnitude_on_the_output(pattern):
    w, x, H = _layer()
    spec = Pattern.parse(pattern, 0.5)
    pruned, kept = sparsegpt_prune(w, H, spec)
    assert torch.all(pruned[~kept] == 0)
    if spec.structured:
        assert torch.all(kept.reshape(64, 32, 4).sum(-1) == 2)
    else:
        assert int(kept.sum()) == w.numel() // 2
    mag = w * keep_top(w.abs(), spec, per_row=False)
    wanda = w * keep_top(w.abs() * torch.diag(H).sqrt(), spec)
    err = {k: float((x @ (v - w).T).pow(2).mean())
           for k, v in (("sparsegpt", pruned), ("wanda", wanda), ("magnitude", mag))}
    assert err["sparsegpt"] < 0.9 * err["wanda"] and err["wanda"] < 0.75 * err["magnitude"], err


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pruning_methods_store_sparse_and_reload(tiny_llama, tiny_opt, pattern, tmp_path):
    for lm in (tiny_llama, tiny_opt):
        for method in (MagnitudePruning(pattern=pattern), Wanda(pattern=pattern), SparseGPT(pattern=pattern)):
            work = models.clone(lm)
            packed = method.compress(work, random_calib(), Budget(name="t"))
            expected = 0
            for ref in work.adapter.linears():
                w = ref.module.weight.data
                o, i = w.shape
                assert int((w == 0).sum()) >= o * i // 2
                if pattern == "2:4":
                    assert torch.all((w != 0).reshape(o, i // 4, 4).sum(-1) <= 2)
                    expected += o * i // 2 * 2 + math.ceil(o * i // 2 * 2 / 8)  # fp16 value + 2-bit index
                else:
                    expected += int((w != 0).sum()) * 2 + math.ceil(o * i / 8)  # fp16 values + bitmap
                expected += 2 * o if ref.module.bias is not None else 0
            assert packed.storage(lm).linear_bytes == expected, (method.name, lm.spec.name)
            store = ArtifactStore(tmp_path / f"{lm.spec.name}-{method.name}")
            store.save("k", packed.tensors(lm), packed.metadata())
            restored = method.restore(models.clone(lm), *store.load("k"))
            ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
            assert torch.equal(restored.model(ids).logits, logits(work, ids))


def test_pipeline_sparsegpt_then_rtn_keeps_both_and_records_stages(tiny_llama, tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load("configs/method/pipeline.yaml")
    method = instantiate(cfg, _convert_="all")
    assert method.stage_names == ["sparsegpt", "rtn"] and method.needs_calibration
    work = models.clone(tiny_llama)
    packed = method.compress(work, random_calib(), Budget(name="t"))
    for ref in work.adapter.linears():
        w = ref.module.weight.data
        o, i = w.shape
        assert torch.all((w != 0).reshape(o, i // 4, 4).sum(-1) <= 2)  # SparseGPT's 2:4 zeros survive RTN
        for row in w[:4]:
            assert row[:128].unique().numel() <= 16  # and the weights are on RTN's 4-bit grid
    assert str(packed.layer_format[next(iter(packed.layer_format))]) == "int4-asym-g128"
    assert "sparsegpt.sparse_kernel_ran" in packed.info
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(tiny_llama), packed.metadata())
    restored = method.restore(models.clone(tiny_llama), *store.load("k"))
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(restored.model(ids).logits, logits(work, ids))
