"""birealnet and biper (bench.compress.binary_conv) on RLFN-S: two values per output channel, first/last untouched and
recorded, shortcuts where shapes allow, the distillation lowers its loss, bits/weight from the artifact's
bytes, identical outputs after restore, refusal of models without convs; BiPer's square wave and its QE."""

import pytest
import torch

from bench import models
from bench.compress.binary_conv import ApproxSign, keeps_shape
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.calib import CalibSet, CalibSpec
from bench.data import data_root
from bench.errors import ConfigError, NotApplicable
from bench.methods.biper import BiPer, _SquareWave, laplace_qe
from bench.methods.birealnet import BiRealNet

ROOT = data_root()
needs_data = pytest.mark.skipif(
    ROOT is None or not (ROOT / "sr_checkpoints/rlfn_bytedance/rlfn_s_x4.pth").is_file(),
    reason="RLFN-S checkpoint not under the data root")
BUDGET = Budget(name="t", calib_samples=8, train_steps=12, batch_size=2, lr=1e-3, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def rlfn_s():
    return models.load(models.ModelSpec(name="rlfn_s", source="sr_checkpoint", arch="rlfn_s",
                                        storage_dtype="float16"))


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)  # smooth random LR patches in 0..255 (the suite's image calib format)
    x = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=g), size=24, mode="bilinear") * 255
    return CalibSet(CalibSpec(name="rand_patches", source="image_patches", images="x"), x.round(), "x")


def _compressed(method, model, calib, tmp_path):
    work = models.clone(model)
    packed = method.compress(work, calib, BUDGET)
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(model), packed.metadata())
    restored = method.restore(models.clone(model), *store.load("k"))
    return packed, restored, store


@needs_data
@pytest.mark.parametrize("cls", [BiRealNet, BiPer])
def test_binary_convs_store_two_values_per_channel_and_restore_exactly(cls, rlfn_s, calib, tmp_path):
    method = cls()
    packed, restored, store = _compressed(method, rlfn_s, calib, tmp_path)
    refs = list(rlfn_s.adapter.linears())
    first, last = refs[0].name, refs[-1].name
    assert first not in packed.layers and last not in packed.layers
    assert packed.extra_metadata["kept_full_precision"] == f"{first},{last}"
    assert packed.info["layers_binarized"] == len(refs) - 2 and packed.info["layers_kept_full_precision"] == 2
    for name in (first, last):  # untouched: the base weights themselves
        assert torch.equal(packed.model.get_submodule(name).weight, rlfn_s.module.get_submodule(name).weight)
    for ref in refs[1:-1]:
        layer = packed.model.get_submodule(ref.name)
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        for row in w:
            vals = row.unique()
            assert vals.numel() == 2 and torch.equal(vals[0], -vals[1])  # exactly +-scale
        assert layer.shortcut == keeps_shape(ref.module)
    # Shortcuts where the conv keeps its input's shape; the record names the layers without one.
    assert packed.model.block_1.c2_r.shortcut and not packed.model.block_1.esa.conv2.shortcut
    assert "block_1.esa.conv2" in packed.info["layers_without_shortcut"].split(",")
    # bits/weight: the artifact's conv bytes x 8 / conv weights; binarized layers cost 1 bit + a fp16 scale per row
    storage = packed.storage(rlfn_s)
    tensors, _ = store.load("k")
    conv_names = {r.name for r in refs}
    conv_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rpartition(".")[0] in conv_names)
    assert storage.linear_bytes == conv_bytes
    assert storage.bits_per_weight == pytest.approx(8 * conv_bytes / rlfn_s.info["n_block_linear_weights"])
    for ref in refs[1:-1]:
        o, n = ref.module.weight.shape[0], ref.module.weight[0].numel()
        layer_bytes = sum(t.numel() * t.element_size() for t in packed.layers[ref.name].values())
        assert layer_bytes == -(-o * n // 8) + 2 * o + 2 * o  # packed bits, fp16 scale, fp16 bias
    # the restored artifact runs the same function
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        assert torch.equal(restored.model(x), packed.model(x))
    assert packed.training.summary()["steps"] == BUDGET.train_steps


@needs_data
def test_birealnet_training_lowers_its_loss(rlfn_s, calib):
    packed = BiRealNet().compress(models.clone(rlfn_s), calib, Budget(
        name="t", calib_samples=8, train_steps=24, batch_size=2, lr=1e-3, warmup_ratio=0.0))
    assert packed.training.summary()["loss_last"] < packed.training.summary()["loss_first"]


def test_square_wave_forward_and_sine_gradient():
    w = torch.linspace(-1, 1, 101, requires_grad=True)
    y = _SquareWave.apply(w, 20.0)
    assert set(y.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(y, torch.where(torch.sin(20 * w) >= 0, 1.0, -1.0))
    y.sum().backward()
    assert torch.allclose(w.grad, 20 * torch.cos(20 * w.detach()))
    # the paper's maximum QE for Laplace latent weights: 0.1028 at b * omega ~ 0.955
    assert laplace_qe(0.955) == pytest.approx(0.102835, abs=1e-5)
    assert laplace_qe(0.5) < laplace_qe(0.955) and laplace_qe(2.0) < laplace_qe(0.955)


def test_approx_sign_gradient_is_bireal_piecewise_polynomial():
    x = torch.tensor([-1.5, -0.5, 0.0, 0.25, 2.0], requires_grad=True)
    y = ApproxSign.apply(x)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 1.5, 0.0]


def test_models_without_convs_are_refused_in_one_line(tiny_llama):
    for method in (BiRealNet(), BiPer()):
        with pytest.raises(NotApplicable, match="binarizes convolutions") as e:
            method.check_applicable(tiny_llama)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError):
        BiPer(stage1_ratio=1.0)
