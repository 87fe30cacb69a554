"""Super-resolution track: image metrics against known values, the MATLAB Y formula, the MAC and activation
counters on layers of known cost, and the SR task reproducing the published RLFN / IMDN numbers on Set5."""

import math

import numpy as np
import pytest
import torch

from bench import image, models
from bench.errors import NotApplicable
from bench.plugins import Workload


def test_y_channel_is_matlab_rgb2ycbcr():
    px = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    assert np.allclose(image.rgb_to_y(px), [[16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966]])


def test_psnr_known_values():
    a = np.random.default_rng(0).integers(10, 240, (20, 24, 3)).astype(np.uint8)
    assert image.psnr(a, a) == math.inf
    b = a.astype(np.int16) + 5  # MSE 25 everywhere
    assert image.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25))
    c = a.astype(np.int16).copy()
    c[:3] += 50  # only inside the border: cropped away
    assert image.psnr(a, c, border=3) == math.inf


def test_ssim_known_values():
    a = np.random.default_rng(1).integers(0, 256, (32, 32)).astype(np.float64)
    assert image.ssim(a, a) == pytest.approx(1.0)
    flat, shifted = np.full((16, 16), 100.0), np.full((16, 16), 110.0)  # only the luminance term differs
    c1 = (0.01 * 255) ** 2
    assert image.ssim(flat, shifted) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1))
    noisy = a + np.random.default_rng(2).normal(0, 20, a.shape)
    assert 0.0 < image.ssim(a, noisy) < image.ssim(a, a + np.random.default_rng(2).normal(0, 5, a.shape)) < 1.0


def test_mac_counter_on_layers_of_known_cost():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert image.count_macs(conv, torch.zeros(1, 3, 10, 10)) == 8 * 10 * 10 * 3 * 9
    dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert image.count_macs(dw, torch.zeros(1, 8, 10, 10)) == 8 * 10 * 10 * 9
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    assert image.count_macs(net, torch.zeros(1, 3, 2, 2)) == 60


def test_activation_counter_on_a_network_counted_by_hand():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.down = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
            self.up = torch.nn.ConvTranspose2d(6, 2, 2, stride=2)
            self.fc = torch.nn.Linear(2, 5)

        def forward(self, x):
            y = self.up(torch.relu(self.down(self.c1(self.c1(x)))))
            return self.fc(y.mean((2, 3)))

    acts, convs = image.count_conv_activations(Net(), torch.zeros(1, 4, 8, 8))
    # c1 twice: 2 x 4 x 8 x 8 = 512; down: 6 x 4 x 4 = 96; up: 2 x 8 x 8 = 128; the Linear's 5 outputs not counted
    assert (acts, convs) == (512 + 96 + 128, 4)


@pytest.fixture(scope="module")
def rlfn():
    spec = models.ModelSpec(name="rlfn", source="sr_checkpoint", arch="rlfn", storage_dtype="float16")
    return models.load(spec)


def test_sr_task_reproduces_published_rlfn_on_set5(rlfn):
    from bench.tasks.sr import SuperResolution

    task = SuperResolution(name="sr_set5", sets=["Set5"])
    task.check_applicable(rlfn)
    metrics = {m.name: m for m in task.evaluate(rlfn)}
    assert metrics["set5.x4.psnr_y.b4"].value == pytest.approx(32.24, abs=0.01)  # paper 32.24 / 0.8952
    assert metrics["set5.x4.ssim_y.b4"].value == pytest.approx(0.8953, abs=0.001)
    assert metrics["set5.x4.psnr_rgb.b4"].value == pytest.approx(30.320, abs=0.01)
    assert len(metrics["set5.x4.psnr_y.b4"].per_sample) == 5
    assert metrics["cost.params"].value == 543_740
    assert metrics["cost.conv_activations.lr256"].value == 126_490_304  # as tests/test_sr_archs.py counts it
    assert metrics["cost.conv_calls.lr256"].value == 57
    work = task.workload(rlfn)
    assert work.kind == "image" and work.inputs.shape == (1, 3, 256, 256)


def test_sr_models_refuse_llm_tasks_and_methods(rlfn):
    from bench.methods.gptq import GPTQ
    from bench.tasks.wikitext import WikiText2Perplexity

    with pytest.raises(NotApplicable, match="does not apply to image_sr model 'rlfn'"):
        WikiText2Perplexity().check_applicable(rlfn)
    with pytest.raises(NotApplicable, match="does not apply to image_sr model 'rlfn'"):
        GPTQ().check_applicable(rlfn)


def test_cpu_backend_times_an_image_workload(rlfn):
    from bench.hardware.cpu import CpuBackend
    from bench.packed import Packed

    backend = CpuBackend(threads=1, warmup=0, min_reps=1, min_seconds=0.0)
    work = Workload(kind="image", inputs=torch.rand(1, 3, 32, 32) * 255, label="sr_x4_lr32")
    m = backend.measure(Packed(rlfn.module, "none", "dense"), work)
    assert m.metrics["latency.sr_x4_lr32.p50_s"] > 0
    assert m.tags["energy_source"] in ("rapl", "model:horowitz_isscc2014_45nm")


def test_static_ptq_stores_int_grids_and_static_activation_ranges(rlfn, tmp_path):
    from bench.budget import Budget
    from bench.cache import ArtifactStore
    from bench.calib import CalibSet, CalibSpec
    from bench.methods.static_ptq import StaticPTQ

    calib = CalibSet(CalibSpec(name="rand", source="image_patches", images="x"),
                     torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 255, "x")
    method = StaticPTQ(w_bits=4, a_bits=4)
    work = models.clone(rlfn)
    packed = method.compress(work, calib, Budget(name="t"))
    refs = list(work.adapter.linears())
    assert set(packed.layers) == {r.name for r in refs[1:-1]}  # first and last layer kept
    seen = []
    for ref in refs[1:-1]:
        w = ref.module.weight.data.reshape(ref.module.weight.shape[0], -1)
        assert all(row.unique().numel() <= 16 for row in w)
        ref.module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].unique().numel()))
    x = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        y = work.module(x)
    assert seen and max(seen) <= 16  # every quantized layer sees at most 2^4 input levels
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(rlfn), packed.metadata())
    restored = method.restore(models.clone(rlfn), *store.load("k"))
    with torch.no_grad():
        assert torch.equal(restored.model(x), y)


def test_hawq_v3_ilp_meets_the_size_limit_and_prefers_sensitive_layers():
    import numpy as np

    from bench.methods.hawq_v3 import solve_bits

    sizes = np.array([100.0, 100.0, 100.0, 100.0])
    sens = {4: np.array([9.0, 1.0, 5.0, 0.5]), 8: np.zeros(4)}  # gain of 8 bits = the 4-bit sensitivity
    assert list(solve_bits(sens, sizes, 0.5)) == [8, 4, 8, 4]  # 6 bits on average: the two most sensitive
    assert list(solve_bits(sens, sizes, 0.0)) == [4, 4, 4, 4]
    assert list(solve_bits(sens, sizes, 1.0)) == [8, 8, 8, 8]


def test_hawq_v3_refuses_uniform_bits_it_would_ignore():
    from bench.errors import ConfigError
    from bench.methods.hawq_v3 import HAWQV3

    with pytest.raises(ConfigError, match="do not apply to hawq_v3.*size_limit"):
        HAWQV3(w_bits=4)


def test_hutchinson_trace_matches_the_gauss_newton_diagonal():
    from bench.methods.hawq_v3 import hutchinson_traces
    from bench.models.vision import ConvAdapter

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))
    x = torch.randn(64, 3)
    ref = next(ConvAdapter(net, "image_sr").linears())
    est = hutchinson_traces(net, [ref], x, iters=200, seed=0)[ref.name]
    # loss = ||W x - W0 x||^2 / N: Hessian wrt W = 2 (I_out kron X^T X / N); its trace / #weights:
    exact = float(2 * 2 * (x.T @ x / 64).trace() / 6)
    assert est == pytest.approx(exact, rel=0.02)


def test_xnor_binarizes_inner_convs_and_keeps_first_and_last(rlfn):
    from bench.budget import Budget
    from bench.methods.xnor import XNOR

    work = models.clone(rlfn)
    packed = XNOR().compress(work, None, Budget(name="t"))
    refs = list(work.adapter.linears())
    assert set(packed.layers) == {r.name for r in refs[1:-1]} and packed.info["layers_kept_full_precision"] == 2
    for ref in refs[1:-1]:
        w = ref.module.weight.data.reshape(ref.module.weight.shape[0], -1)
        assert all(row.abs().unique().numel() == 1 for row in w)  # +-alpha per output channel
    assert torch.equal(refs[0].module.weight, rlfn.adapter.linears().__next__().module.weight)
    seen = []
    refs[1].module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        work.module(torch.rand(1, 3, 16, 16) * 255)
    x = seen[0]  # each pixel's channel vector is +-beta
    assert torch.allclose(x.abs(), x.abs().amax(dim=1, keepdim=True).expand_as(x))


def test_minifloat_formats_and_grid(rlfn, tmp_path):
    from bench.budget import Budget
    from bench.cache import ArtifactStore
    from bench.calib import CalibSet, CalibSpec
    from bench.errors import ConfigError
    from bench.methods.minifloat import Minifloat, minifloat

    e2m1 = minifloat("e2m1")
    assert e2m1.bits == 4 and e2m1.magnitudes.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert minifloat("e4m3").max_value == 480.0  # no inf/NaN (OCP E4M3FN stops at 448)
    with pytest.raises(ConfigError, match="eXmY"):
        minifloat("e5m3")
    calib = CalibSet(CalibSpec(name="rand", source="image_patches", images="x"),
                     torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 255, "x")
    method = Minifloat(w_format="e2m1", a_format="e3m2")
    work = models.clone(rlfn)
    packed = method.compress(work, calib, Budget(name="t"))
    ref = list(work.adapter.linears())[1]
    w = ref.module.weight.data.reshape(ref.module.weight.shape[0], -1)
    scale = packed.layers[ref.name]["scale"].float()
    assert set((w / scale).abs().unique().tolist()) <= set(e2m1.magnitudes.tolist())
    x = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(1)) * 255
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(rlfn), packed.metadata())
    restored = method.restore(models.clone(rlfn), *store.load("k"))
    with torch.no_grad():
        assert torch.equal(restored.model(x), work.module(x))
