"""ternary and xnor: value sets, storage bytes, exact reload (xnor's activation hooks come back too)."""

import math

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.errors import BenchError
from bench.methods.ternary import Ternary, ternarize
from bench.methods.xnor import XNOR, binarize_tokens
from conftest import logits


@pytest.mark.parametrize("rule", ["twn", "absmean"])
def test_ternary_rows_take_three_values_and_twn_scale_is_the_kept_mean(rule):
    w = torch.randn(32, 200, generator=torch.Generator().manual_seed(0))
    t, scale = ternarize(w, rule)
    assert set(t.unique().tolist()) == {-1.0, 0.0, 1.0}
    wq = t * scale.float()
    for r in range(32):
        assert wq[r].unique().numel() == 3
    if rule == "twn":
        keep = w.abs() > 0.7 * w.abs().mean(dim=1, keepdim=True)
        assert torch.equal(t != 0, keep)
        kept_mean = (w.abs() * keep).sum(dim=1) / keep.sum(dim=1)
        assert torch.allclose(scale.float().squeeze(1), kept_mean, rtol=1e-3)


def _roundtrip(method, lm, tmp_path):
    work = models.clone(lm)
    packed = method.compress(work, None, Budget(name="t"))
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(lm), packed.metadata())
    restored = method.restore(models.clone(lm), *store.load("k"))
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(restored.model(ids).logits, logits(work, ids))
    return work, packed


def test_ternary_stores_1_6_bits_per_weight_and_reloads(tiny_llama, tmp_path):
    _, packed = _roundtrip(Ternary(), tiny_llama, tmp_path)
    refs = list(tiny_llama.adapter.linears())
    expected = sum(math.ceil(o * i / 5) + 2 * o for o, i in (r.module.weight.shape for r in refs))
    assert packed.storage(tiny_llama).linear_bytes == expected
    with pytest.raises(BenchError):
        Ternary(rule="nope")


def test_xnor_binarizes_inputs_too_and_its_hooks_survive_reload(tiny_opt, tmp_path):
    x = torch.randn(2, 5, 64)
    xb = binarize_tokens(x)
    for tok in xb.reshape(-1, 64):
        assert tok.abs().unique().numel() == 1  # one magnitude per token: beta * sign
    work, packed = _roundtrip(XNOR(), tiny_opt, tmp_path)
    assert packed.info["activations"].startswith("binary")
    assert all(str(v).endswith("+a1-per_token-meanabs") for v in packed.layer_format.values())
