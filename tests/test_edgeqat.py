"""EdgeQAT on tiny LLaMA and OPT: every weight on its tensor's 4-bit grid, static 8-bit activations at every
linear input, bits/weight from the artifact's bytes, training lowers its own loss, exact reload."""

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.methods.edgeqat import EdgeQAT
from conftest import loaded_tiny, logits, random_calib


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_edgeqat_weights_and_activations_on_their_grids(arch, tmp_path):
    lm = loaded_tiny(arch, layers=2)
    work = models.clone(lm)
    method = EdgeQAT()
    packed = method.compress(work, random_calib(), Budget(name="t", train_steps=10, batch_size=2, lr=2e-4))
    assert packed.training.summary()["loss_last"] < packed.training.summary()["loss_first"]
    model = packed.model
    adapter = models.adapter_for(model)
    seen = {}
    hooks = [r.module.register_forward_hook(lambda m, a, o, n=r.name: seen.__setitem__(n, a[0].detach()))
             for r in adapter.linears()]
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    n_bytes = 0
    for ref in adapter.linears():
        step = float(packed.layers[ref.name]["scale"].float())
        w = ref.module.weight.detach()
        assert torch.equal(w / step, (w / step).round()) and (w / step).min() >= -8 and (w / step).max() <= 7
        x = seen[ref.name]  # the hooked input, i.e. after activation fake quantization: at most 256 levels
        a_step = float(packed.layers[ref.name]["act_step"].float())
        assert (x / a_step - (x / a_step).round()).abs().max() < 1e-3 and len(torch.unique(x)) <= 256
        # 4-bit codes packed + fp16 weight step + fp16 activation step and zero + sign flag + fp16 bias
        n_bytes += w.numel() // 2 + 2 + 2 + 2 + 1 + (2 * ref.module.bias.numel() if ref.module.bias is not None else 0)
    assert packed.storage(lm).linear_bytes == n_bytes
    store = ArtifactStore(tmp_path / arch)
    store.save("k", packed.tensors(lm), packed.metadata())
    restored = method.restore(models.clone(lm), *store.load("k"))
    assert torch.equal(restored.model(ids).logits, logits(models.with_module(lm, model), ids))
