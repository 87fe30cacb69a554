"""method=token_pruning (SPViT / HeatViT token selectors with a package token), checked on DeiT-Tiny shapes
(embed 192, 3 heads, 12 blocks, 197 tokens at 224) with random init: output shapes, tokens kept per pruned block =
ceil(keep_ratio x n) + 1 package token + the class token(s), the counted MACs, the selectors training (their
distillation loss falls), the artifact restoring the same model, and the one-line refusals."""

import math

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.calib import CalibSet, CalibSpec
from bench.compress.distill import kd_logits
from bench.errors import ConfigError, NotApplicable
from bench.methods.token_pruning import TokenPruning
from bench.packed import Packed
from conftest import loaded_vision, tiny_vit


@pytest.fixture(scope="module")
def deit_tiny_shapes():
    return tiny_vit(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, image_size=224,
                patch_size=16)


def _images(n: int, size: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 255


def _lengths(model) -> list[int]:
    """The sequence length each encoder layer really runs on in one forward pass."""
    seen = []
    enc = model.adapter.vit_encoder()
    handles = [m.attention.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
               for m in enc.layers]
    with torch.no_grad():
        out = model.module(_images(2, model.info["image_size"]))
    for h in handles:
        h.remove()
    return out, seen


@pytest.mark.parametrize("selector", ["spvit", "heatvit"])
def test_deit_tiny_shapes_keep_ceil_ratio_plus_package(deit_tiny_shapes, selector):
    model = models.clone(deit_tiny_shapes)
    method = TokenPruning(selector=selector, keep_ratio=0.7, prune_blocks=[3, 6, 9])
    method.check_applicable(model)
    pruned = method.install(model)
    logits, lengths = _lengths(model)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    n, expect = 196, []
    for _ in range(3):  # each pruned block keeps ceil(0.7 n) of the n patch tokens, + package + CLS
        expect.append(math.ceil(0.7 * n))
        n = expect[-1]
    assert expect == [138, 97, 68]
    assert [layer.last_counts for layer in pruned] == [(196, 138), (138, 97), (97, 68)]
    assert lengths == [197] * 3 + [1 + 138 + 1] * 3 + [1 + 97 + 1] * 3 + [1 + 68 + 1] * 3
    info, rows = method.facts(model, deit_tiny_shapes.module, pruned)
    # DeiT-Tiny's 1.25 GMACs: patch conv 28.9 M + 12 x (linears 87.1 M + attention matmuls 14.9 M) + head
    assert info["macs_before"] == 28_901_376 + 12 * (197 * 442_368 + 2 * 197 * 197 * 192) + 192_000
    assert 0.5 < info["macs_ratio"] < 0.75 and info["tokens_final"] == 70
    assert info["keep_ratio_achieved"] == pytest.approx((138 / 196 + 97 / 138 + 68 / 97) / 3)
    assert [r["tokens_into_block"] for r in rows] == [140, 99, 70]
    roles = {r.role for r in model.adapter.linears()}
    assert {"q", "k", "v", "o", "up", "down", "token_selector"} <= roles


def test_distillation_token_stays_with_the_class_token():
    model = tiny_vit(deit=True)  # DeiT: [CLS, DIST, 64 patches]
    pruned = TokenPruning(keep_ratio=0.5, prune_blocks=[1, 2]).install(model)
    logits, lengths = _lengths(model)
    assert logits.shape == (2, 1000)
    assert lengths == [66, 2 + 32 + 1, 2 + 16 + 1, 2 + 16 + 1]
    assert [layer.last_counts for layer in pruned] == [(64, 32), (32, 16)]


def _kd(teacher, student, images) -> float:
    with torch.no_grad():
        return float(kd_logits(student(images), teacher(images)))


def test_selectors_train_and_the_artifact_restores_the_model():
    base = tiny_vit()
    calib = CalibSet(CalibSpec(name="rand"), _images(8, 64), "x")  # 64-pixel crops: resized to the model's 32
    images = torch.nn.functional.interpolate(calib.windows, size=(32, 32), mode="bilinear", antialias=True)
    method = TokenPruning(selector="heatvit", keep_ratio=0.5, prune_blocks=[1, 2], selector_lr=1e-2)
    untrained = models.clone(base)
    method.install(untrained)  # the same seeded initial selectors compress() starts from
    budget = Budget(name="test", train_steps=30, batch_size=4, lr=1e-4, warmup_ratio=0.0)
    model = models.clone(base)
    packed = method.compress(model, calib, budget)
    before, after = _kd(base.module, untrained.module, images), _kd(base.module, packed.model, images)
    assert after < 0.9 * before  # the distillation loss of the pruned model fell (-20% here)
    assert packed.training.summary()["steps"] == 30 and packed.info["keep_ratio_achieved"] == 0.5
    assert packed.info["macs_after"] < 0.7 * packed.info["macs_before"]
    assert "dropped from the sequence" in packed.extra_metadata["latency"]
    assert packed.execution == "dense" and not any(p.requires_grad for p in packed.model.parameters())
    restored = method.restore(models.clone(base), packed.tensors(base), packed.metadata())
    copied = models.clone(models.with_module(base, packed.model))  # deepcopy: hooks follow their copied selectors
    with torch.no_grad():
        assert torch.equal(restored.model(images), packed.model(images))
        assert torch.equal(copied.module(images), packed.model(images))
    assert restored.info["macs_after"] == packed.info["macs_after"]
    # the ViT's weights keep their names: storage counts them as the baseline does, the selectors beside them
    unpruned = Packed(base.module, "none", "dense").storage(base)
    assert packed.storage(base).linear_bytes == unpruned.linear_bytes
    assert packed.storage(base).other_bytes == unpruned.other_bytes + 2 * packed.info["selector_params"]


def test_refuses_cnns_and_language_models(tiny_llama):
    from transformers import ResNetConfig, ResNetForImageClassification

    cnn = loaded_vision(ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                            num_labels=1000)), 32, "tiny_resnet")
    assert cnn.adapter.vit_encoder() is None
    for model, what in ((cnn, "a CNN image classifier"), (tiny_llama, "a causal_lm model")):
        with pytest.raises(NotApplicable) as err:
            TokenPruning().check_applicable(model)
        assert str(err.value) == (f"method 'token_pruning' applies only to vision transformers; '{model.spec.name}' "
                                  f"is {what}; use a ViT/DeiT classifier, e.g. model=deit_tiny")


@pytest.mark.parametrize("bad", [{"keep_ratio": 1.0}, {"keep_ratio": 0}, {"selector": "dynamicvit"},
                                 {"prune_blocks": [6, 3]}, {"prune_blocks": []}, {"selector_lr": 0}])
def test_bad_configs_are_one_line(bad):
    with pytest.raises(ConfigError) as err:
        TokenPruning(**bad)
    assert "\n" not in str(err.value)


def test_blocks_past_the_model_are_refused():
    with pytest.raises(ConfigError, match=r"reaches past the 4 blocks of 'tiny_vit'; use block indices 0..3"):
        TokenPruning(prune_blocks=[3, 6, 9]).check_applicable(tiny_vit())
