"""Agile-Quant on tiny LLaMA and OPT: GPTQ weights, every linear input on its per-channel static grid, query / key /
value on per-head grids and log2 probabilities during the forward, the inattentive tokens pruned (kept hidden state,
masked key), the activation scales counted in the bytes, exact reload; the quantizers on their own; bad configs."""

import math

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.errors import ConfigError
from bench.methods.agile_quant import AgileQuant
from bench.methods.gptq import GPTQ
from bench.quant import attention
from bench.quant.activation import channel_absmax, fake_quant_channels, fake_quant_log2, symmetric_scale
from conftest import loaded_tiny, logits, random_calib

BUDGET = Budget(name="t")


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_agile_quant_grids_pruning_bytes_and_reload(arch, tmp_path):
    lm = loaded_tiny(arch, layers=3)
    method = AgileQuant(act_bits=4, prune_ratio=0.25, prune_blocks=[0])  # 4-bit: "at most 16 values" is sharp
    packed = method.compress(models.clone(lm), random_calib(), BUDGET)
    model = packed.model
    adapter = models.adapter_for(model)
    names = {(r.block, r.role): r.name for r in adapter.linears()}
    seen, views, outputs = {}, [], {}
    hooks = [r.module.register_forward_hook(lambda m, a, o, n=r.name: seen.__setitem__(n, a[0].detach()))
             for r in adapter.linears()]
    hooks += [b.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
              for i, b in enumerate(adapter.blocks())]
    aqs = [getattr(adapter.attention(b), attention.ATTRIBUTE) for b in adapter.blocks()]
    for aq in aqs:
        aq.observers.append(views.append)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for ref in adapter.linears():  # each input channel on its own grid: at most 2^4 values per channel
        x, scale = seen[ref.name].reshape(-1, ref.module.in_features), packed.layers[ref.name]["act_scale"].float()
        assert ((x / scale) - (x / scale).round()).abs().max() < 1e-3
        assert max(len(torch.unique(x[:, c])) for c in range(x.shape[1])) <= 16
    for view in views:
        for h in range(view.query.shape[1]):
            assert len(torch.unique(view.query[:, h])) <= 16 and len(torch.unique(view.key[:, h])) <= 16
        p = view.probs[view.probs > 0]
        assert torch.equal(torch.log2(p), torch.log2(p).round()) and torch.log2(p).min() >= -15
    pruner = aqs[0].key_mask.__self__
    pruned = pruner.pruned[0]
    assert int(pruned.sum()) == int(16 * 0.25) and not pruned[0]  # the first token is never inattentive
    for i in (1, 2):  # pruned tokens leave block 0 and pass the later blocks unchanged; the others change
        assert torch.equal(outputs[i][0, pruned], outputs[0][0, pruned])
        assert not torch.equal(outputs[i][0, ~pruned], outputs[0][0, ~pruned])
        later = views[i].probs[0][:, :, pruned]  # no later query attends to a pruned key, but the token itself
        own = torch.nonzero(pruned).flatten()
        assert torch.all(later[:, ~pruned] == 0) and torch.all(later[:, own, torch.arange(len(own))] > 0)
    base = GPTQ(bits=4, group_size=128, act_order=True).compress(models.clone(lm), random_calib(), BUDGET)
    kv_heads = getattr(lm.module.config, "num_key_value_heads", 4)
    scales = sum(2 * r.module.in_features for r in adapter.linears()) + 3 * (2 * 4 + 2 * kv_heads + 2 * kv_heads)
    assert packed.storage(lm).linear_bytes == base.storage(lm).linear_bytes + scales
    assert packed.layer_format[names[(0, "v")]].notes == ("value-a4-per_head-static", "probs-a4-log2")
    store = ArtifactStore(tmp_path / arch)
    store.save("k", packed.tensors(lm), packed.metadata())
    restored = method.restore(models.clone(lm), *store.load("k"))
    assert torch.equal(restored.model(ids).logits, logits(models.with_module(lm, model), ids))


def test_per_channel_scales_keep_small_channels_beside_an_outlier_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 4, generator=g) * torch.tensor([0.05, 1.0, 1.0, 200.0])  # channel 3: outliers
    per_channel = fake_quant_channels(x, symmetric_scale(channel_absmax(x, -1), 8), 8, -1)
    per_tensor = fake_quant_channels(x, symmetric_scale(x.abs().amax().reshape(1), 8), 8, -1)
    small = x[..., 0]
    assert (per_channel[..., 0] - small).abs().max() <= 0.5 * float(symmetric_scale(small.abs().amax(), 8)) + 1e-7
    assert torch.all(per_tensor[..., 0] == 0)  # one range for all: the small channel rounds to zero
    assert float(symmetric_scale(torch.tensor(127.5), 8)) == 1.0


def test_log2_quantizer_levels():
    p = torch.tensor([1.0, 0.5, 0.3, 2.0**-15, 2.0**-15.6, 2.0**-16, 0.0])
    assert fake_quant_log2(p, 4).tolist() == [1.0, 0.5, 0.25, 2.0**-15, 0.0, 0.0, 0.0]
    assert math.isclose(float(fake_quant_log2(torch.tensor([0.2]), 2)), 0.25)


@pytest.mark.parametrize("override, problem", [
    ({"act_bits": 4.5}, "method.act_bits=4.5 is not an integer bit-width"),
    ({"probs_bits": 1}, "method.probs_bits=1 is out of range"),
    ({"prune_ratio": 1.0}, "method.prune_ratio=1.0 is out of range"),
    ({"prune_blocks": [-1]}, "method.prune_blocks=[-1] has a negative block index"),
])
def test_bad_config_is_one_line_naming_the_fix(override, problem):
    with pytest.raises(ConfigError) as e:
        AgileQuant(**override)
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_a_pruned_block_the_model_lacks_is_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        AgileQuant(prune_blocks=[5]).compress(models.clone(loaded_tiny("llama")), random_calib(), BUDGET)
    assert "names a block the model does not have (2 blocks)" in str(e.value) and "\n" not in str(e.value)
