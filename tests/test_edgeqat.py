"""EdgeQAT on tiny LLaMA and OPT: every weight on its tensor's 4-bit grid, static activations at every linear input,
the attention's query and key (and the KV cache's key and value, and the probabilities) on their own grids during the
forward, bits/weight from the artifact's bytes, training lowers its own loss and records its terms, exact reload;
the distribution term falls as the student's maps approach the teacher's; a bad bit-width is one line."""

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.errors import ConfigError
from bench.methods.edgeqat import EdgeQAT, distribution_term, head_spread, map_cosines
from bench.quant import attention
from conftest import loaded_tiny, logits, random_calib


def _on_grid(x: torch.Tensor, step: float) -> bool:
    """x = (code - zero) x step for integer codes and zero point."""
    return bool(((x / step) - (x / step).round()).abs().max() < 1e-3)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_edgeqat_weights_activations_and_attention_on_their_grids(arch, tmp_path):
    lm = loaded_tiny(arch, layers=2)
    method = EdgeQAT(query_bits=4, kv_bits=3)  # narrow grids make "at most 2^bits values" a sharp check
    packed = method.compress(models.clone(lm), random_calib(), Budget(name="t", train_steps=10, batch_size=2, lr=2e-4))
    stage = packed.training.stages[0]
    assert stage.loss_last < stage.loss_first
    assert set(stage.terms) >= {"ce", "kd", "dist", "ent"} and len(stage.terms["dist"]) == stage.steps
    model = packed.model
    adapter = models.adapter_for(model)
    seen, views = {}, []
    hooks = [r.module.register_forward_hook(lambda m, a, o, n=r.name: seen.__setitem__(n, a[0].detach()))
             for r in adapter.linears()]
    for block in adapter.blocks():
        getattr(adapter.attention(block), attention.ATTRIBUTE).observers.append(views.append)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    n_bytes = 0
    names = {(r.block, r.role): r.name for r in adapter.linears()}
    for ref in adapter.linears():
        stored = packed.layers[ref.name]
        step = float(stored["scale"].float())
        w = ref.module.weight.detach()
        assert torch.equal(w / step, (w / step).round()) and (w / step).min() >= -8 and (w / step).max() <= 7
        x = seen[ref.name]  # the hooked input, i.e. after activation fake quantization: at most 256 levels
        assert _on_grid(x, float(stored["act_step"].float())) and len(torch.unique(x)) <= 256
        # 4-bit codes packed + fp16 weight step + input quantizer (fp16 step, fp16 zero, bool sign) + fp16 bias
        # + 5 bytes per attention quantizer stored with this projection (query: q, key: k, value and probs: v)
        n_attn = {"q": 1, "k": 1, "v": 2}.get(ref.role, 0)
        n_bytes += w.numel() // 2 + 2 + 5 + 5 * n_attn + (2 * ref.module.bias.numel() if ref.module.bias is not None
                                                          else 0)
    assert len(views) == 2
    for view in views:
        q_store, k_store = packed.layers[names[(view.block, "q")]], packed.layers[names[(view.block, "k")]]
        assert len(torch.unique(view.query)) <= 2**4 and _on_grid(view.query, float(q_store["attn_query_step"]))
        assert len(torch.unique(view.key)) <= 2**3 and _on_grid(view.key, float(k_store["attn_key_step"]))
        assert len(torch.unique(view.probs)) <= 2**8
    assert packed.storage(lm).linear_bytes == n_bytes
    fmt = packed.layer_format[names[(0, "k")]]
    assert fmt.notes == ("key-a3-per_tensor-static",) and "query-a4" in str(packed.layer_format[names[(0, "q")]])
    assert packed.info["query_bits"] == 4 and packed.info["kv_bits"] == 3
    store = ArtifactStore(tmp_path / arch)
    store.save("k", packed.tensors(lm), packed.metadata())
    restored = method.restore(models.clone(lm), *store.load("k"))
    assert torch.equal(restored.model(ids).logits, logits(models.with_module(lm, model), ids))


def test_quantized_query_key_change_the_model_and_the_base_keeps_its_attention():
    lm = loaded_tiny("llama", layers=2)
    before = lm.module.config._attn_implementation
    packed = EdgeQAT(query_bits=2, kv_bits=2).compress(models.clone(lm), random_calib(),
                                                      Budget(name="t", train_steps=2, batch_size=2, lr=1e-5))
    assert lm.module.config._attn_implementation == before
    assert packed.model.config._attn_implementation == attention.ATTENTION_NAME
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        quantized = packed.model(ids).logits
        for block in models.adapter_for(packed.model).blocks():  # the same weights, exact attention
            aq = getattr(models.adapter_for(packed.model).attention(block), attention.ATTRIBUTE)
            aq.query = aq.key = aq.value = aq.probs = None
        exact_attention = packed.model(ids).logits
    assert (quantized - exact_attention).abs().max() > 1e-3


def test_distribution_term_falls_as_student_maps_approach_the_teachers():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 8, 4, generator=g), torch.randn(2, 3, 8, 4, generator=g)
    teacher = q @ k.transpose(2, 3)
    noise = torch.randn(teacher.shape, generator=g)
    align = [float(distribution_term(map_cosines((teacher + e * noise) * 0.5, q, k), "align"))
             for e in (3.0, 1.0, 0.3, 0.0)]
    assert all(a > b for a, b in zip(align, align[1:]))
    assert align[-1] == pytest.approx(-torch.log(torch.tensor(6.0)).item(), abs=1e-5)  # 2 x 3 maps, cosine 1
    reference = [float(distribution_term(map_cosines(teacher + e * noise, q, k), "reference")) for e in (3.0, 0.0)]
    assert reference[0] < reference[1]  # the released sign rises as the maps align


def test_entropy_proxy_is_the_sum_of_log_one_plus_head_variance():
    x = torch.tensor([[[[1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]]]])  # one head, two tokens
    assert float(head_spread(x)) == pytest.approx(float(torch.log1p(torch.tensor(4 / 3))))


@pytest.mark.parametrize("override, problem", [
    ({"query_bits": 1}, "method.query_bits=1 is out of range"),
    ({"kv_bits": 4.5}, "method.kv_bits=4.5 is not an integer bit-width"),
    ({"bits": 9}, "method.bits=9 is out of range"),
    ({"distribution_sign": "sideways"}, "unknown method.distribution_sign 'sideways'"),
])
def test_bad_config_is_one_line_naming_the_fix(override, problem):
    with pytest.raises(ConfigError) as e:
        EdgeQAT(**override)
    assert problem in str(e.value) and "\n" not in str(e.value)
