"""Diffusion track: a tiny suite-trained DDPM (seconds of training), the methods' stored forms (fp_lowbit on
its FP grid, binarydm's per-basis values, hybrid_sd's switch step), the Frechet distance, and one full run
through the runner with its sample grid and the cpu backend's diffusion workload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench import frechet, models, sampler
from bench.budget import Budget
from bench.calib import CalibSpec, load as load_calib

TINY_RECIPE = {"dataset": "sklearn_digits", "ch": 8, "mults": [1, 2], "n_res": 1, "timesteps": 1000,
               "train_steps": 30, "batch_size": 32, "lr": 2e-3, "ema_decay": 0.9, "seed": 0}
TINY_BUDGET = Budget(name="tiny", calib_samples=4, calib_seqlen=1, train_steps=3, batch_size=8, lr=1e-3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    results = tmp_path_factory.mktemp("diffusion_results")
    spec = models.ModelSpec(name="ddpm_tiny", source="suite_trained", recipe=dict(TINY_RECIPE),
                            results=str(results))
    return spec, models.load(spec)


@pytest.fixture(scope="module")
def calib():
    return load_calib(CalibSpec(name="ddpm_noise8", source="gaussian_noise", patch=8, channels=1), None, 4, 1)


def test_ddpm_is_trained_once_and_cached(trained):
    spec, model = trained
    assert model.kind == "diffusion" and model.info["image_side"] == 8
    assert model.info["n_train_images"] == 1797 and model.info["train_seconds"] > 0
    again = models.load(spec)  # read from <results>/trained, not retrained
    assert again.info["train_cache"] == "hit" and again.weights_sha256 == model.weights_sha256
    roles = {r.role for r in model.adapter.linears()}
    assert {"time_mlp", "conv_in", "res.conv1", "res.temb", "res.conv2", "down", "up", "conv_out"} <= roles
    assert [level.name for level in model.adapter.levels()] == ["down.0", "down.1", "mid", "up.0", "up.1"]


def test_ddim_sampler_is_deterministic(trained):
    _, model = trained
    sched, x = sampler.model_schedule(model), sampler.seeded_noise(3, 8, seed=5)
    a = sampler.ddim_sample(model.module, x, sched, 4)
    assert torch.equal(a, sampler.ddim_sample(model.module, x.clone(), sched, 4))
    assert sched.ddim_timesteps(4) == [999, 749, 499, 249]


def test_frechet_distance_zero_for_identical_positive_otherwise():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    assert frechet.frechet_distance(a, a.copy()) == pytest.approx(0.0, abs=1e-8)
    b = rng.normal(size=(300, 6)) + 0.5
    assert frechet.frechet_distance(a, b) > 0.5  # mean shift alone contributes 6 x 0.25
    assert frechet.frechet_distance(a, rng.normal(size=(300, 6))) > 0


def test_fp_lowbit_weights_lie_on_the_chosen_fp_grid(trained, calib):
    from bench.methods.fp_lowbit import FPLowBit
    from bench.quant.floating import FloatFormat
    from bench.quant.integer import weight_matrix

    method = FPLowBit(w_bits=4, calib_steps=3, calib_rows=256, clip_grid=5)
    packed = method.compress(models.clone(trained[1]), calib, TINY_BUDGET)
    m = models.with_module(trained[1], packed.model)
    for ref in m.adapter.linears():
        fmt_name = packed.layer_format[ref.name].name.split("_")[1].split("-")[0]
        e, man = (int(v) for v in fmt_name[1:].split("m"))
        fmt = FloatFormat(e, man)
        w = weight_matrix(ref.module)
        u = (w / packed.layers[ref.name]["scale"].float()).abs().double()
        dist = (u.unsqueeze(-1) - fmt.magnitudes.view(1, 1, -1)).abs().amin(-1)
        assert float(dist.max()) < 1e-5, ref.name
    assert packed.info["rounding_err_ratio_mean"] <= 1.0 + 1e-6  # learned rounding never worse than nearest
    # the artifact round-trips to the same weights
    restored = method.restore(models.clone(trained[1]), packed.tensors(trained[1]), packed.metadata())
    for a, b in zip(restored.model.state_dict().values(), packed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-3)


def test_binarydm_weights_take_the_documented_values_per_basis(trained, calib):
    from bench.methods.binarydm import BinaryDM
    from bench.quant.integer import weight_matrix

    method = BinaryDM(calib_steps=3)
    packed = method.compress(models.clone(trained[1]), calib, TINY_BUDGET)
    m = models.with_module(trained[1], packed.model)
    refs = list(m.adapter.linears())
    assert refs[0].name not in packed.layers and refs[-1].name not in packed.layers  # first/last kept
    n_multi = 0
    for ref in refs[1:-1]:
        st = packed.layers[ref.name]
        w = weight_matrix(ref.module)
        s1 = st["s1"].float()
        if "s2" in st:
            n_multi += 1
            s2 = st["s2"].float()
            allowed = torch.stack([s1 + s2, s1 - s2, -s1 + s2, -s1 - s2], dim=-1)  # (out, 1, 4)
        else:
            allowed = torch.stack([s1, -s1], dim=-1)
        dist = (w.unsqueeze(-1) - allowed).abs().amin(-1)
        assert float(dist.max()) < 1e-6, ref.name
    assert n_multi > 0  # the head/tail levels got the second basis
    bits = packed.storage(trained[1])
    assert bits.bits_per_weight < 16


def test_hybrid_sd_switches_models_at_the_configured_step(trained):
    from bench.methods.hybrid_sd import HybridSD

    small = models.ModelSpec(name="small", source="suite_trained", recipe={**TINY_RECIPE, "seed": 1},
                             results=trained[0].results)
    method = HybridSD(small_model=small, large_steps=3, total_steps=10)
    packed = method.compress(models.clone(trained[1]), None, TINY_BUDGET)
    unet = packed.model
    calls = []
    unet.late.register_forward_pre_hook(lambda _m, a: calls.append(("small", int(a[1][0]))))
    unet.conv_in.register_forward_pre_hook(lambda _m, a: calls.append(("large", None)))
    sched = sampler.model_schedule(trained[1])
    sampler.ddim_sample(unet, sampler.seeded_noise(2, 8, 0), sched, 10)
    assert [c[0] for c in calls] == ["large"] * 3 + ["small"] * 7
    assert calls[3][1] == sched.ddim_timesteps(10)[3]


def test_fd_digits_run_end_to_end_with_grid_and_diffusion_workload(trained, migrated_store, monkeypatch):
    import shutil

    from tests.conftest import compose

    from bench.runner import Runner

    results = Path(trained[0].results)  # the tiny DDPM is already trained and cached there
    shutil.copy(migrated_store, results / "mlflow.db")
    monkeypatch.setenv("BENCH_RESULTS", str(results))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = [f"model.recipe.{k}={v}" for k, v in TINY_RECIPE.items() if k not in ("mults", "dataset")]
    cfg = compose("model=ddpm_digits", *recipe, "method=fp_lowbit", "method.w_bits=8", "method.calib_steps=2",
                  "method.calib_rows=128", "calib=ddpm_noise8", "budget=tiny", "task=fd_digits",
                  "task.n_samples=32", "task.steps=3", "task.extractor.epochs=1", "compare_baseline=false",
                  "threads=1", "hardware.min_seconds=0", "hardware.min_reps=1", "hardware.warmup=0",
                  f"paths.results={results}")
    result = Runner(cfg).run()[1]
    m = result.metrics
    fd = "digits8.fd_lenet.n32.ddim3_eta0.ref_all1797"
    assert m[fd] > 0 and m["digits8.teacher_mse.n32.ddim3_eta0"] >= 0
    assert "latency.ddim3_eta0_1img.per_step.p50_s" in m
    assert any(k.startswith("energy.j_per_image.") for k in m)
    assert 8 <= m["storage.bits_per_weight.block_linears"] < 9
    from mlflow.tracking import MlflowClient

    arts = [a.path for a in MlflowClient().list_artifacts(result.run_id)]
    assert "samples_grid.png" in arts


def test_existing_methods_apply_through_the_adapter(trained, calib):
    from bench.methods.minifloat import Minifloat
    from bench.methods.rtn import RTN

    for method, c in ((RTN(bits=4, group_size=-1), None), (Minifloat(w_format="e2m1", a_format="e4m3"), calib)):
        method.check_applicable(trained[1])
        packed = method.compress(models.clone(trained[1]), c, TINY_BUDGET)
        assert packed.layers  # every targeted conv/linear was quantized through adapter.linears()
        sched = sampler.model_schedule(trained[1])
        out = sampler.ddim_sample(packed.model, sampler.seeded_noise(2, 8, 0), sched, 2)
        assert torch.isfinite(out).all()


# --- the real path: diffusers UNets and FID ---------------------------------------------------------------
class _StandIn(torch.nn.Module):
    """A tiny random 'Inception': never the real weights, so its distance must not be called FID."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 7, stride=8)

    def forward(self, x):
        return torch.relu(self.conv(x / 255.0)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler, UNet2DModel

    d = tmp_path_factory.mktemp("tiny_ddpm_pipeline")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    unet.save_pretrained(d / "unet")  # a DDPMPipeline folder's layout, built from a config: no download
    DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02).save_pretrained(d / "scheduler")
    return d


def test_fid_code_path_runs_on_a_diffusers_unet_with_a_stand_in_extractor(diffusers_dir, tmp_path, monkeypatch):
    from bench.tasks.fid import DiffusionFID

    spec = models.ModelSpec(name="tiny_diffusers", source="diffusers", name_or_path=str(diffusers_dir))
    model = models.load(spec)
    assert model.kind == "diffusion" and model.info["image_side"] == 8 and model.info["timesteps"] == 1000
    assert len(list(model.adapter.linears())) > 5  # its convs/linears by role, so methods apply
    rng = np.random.default_rng(0)
    f = rng.normal(size=(64, 16))
    np.savez(tmp_path / "ref.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    monkeypatch.setattr(DiffusionFID, "extractor_override", (_StandIn(), "standin"))
    task = DiffusionFID(name="fid_tiny", n_samples=8, steps=2, batch=4, reference_stats=str(tmp_path / "ref.npz"),
                        reference_name="random16")
    (metric,) = task.evaluate(model)
    assert metric.name == "fd_standin.random16.n8.ddim2_eta0" and metric.value > 0
    assert metric.notes["real_inception"] is False


def test_fid_refuses_a_non_inception_extractor(tmp_path):
    from bench.errors import ConfigError, DataMissing
    from bench.tasks.fid import DiffusionFID, is_real_inception, metric_name

    assert not is_real_inception(_StandIn())
    with pytest.raises(ConfigError, match="refusing to report FID"):
        metric_name("standin", False, "cifar10", 10, 5, claim_fid=True)
    assert metric_name("x", True, "cifar10", 10, 5, claim_fid=True) == "fid.clean_fid.cifar10.n10.ddim5_eta0"
    task = DiffusionFID(inception_weights=str(tmp_path), download=False)  # no weights there: no FID, one line
    with pytest.raises(DataMissing, match="Inception weights"):
        task.extractor()


def test_qdiffusion_splits_skip_concatenations_and_calibrates_over_all_timesteps(trained, calib):
    from bench.methods.qdiffusion import QDiffusion

    splits = trained[1].adapter.skip_concat_layers()
    assert splits and all(name.startswith("up.") for name in splits)
    method = QDiffusion(w_bits=8, a_bits=8, calib_steps=10, interval=5)
    packed = method.compress(models.clone(trained[1]), calib, TINY_BUDGET)
    assert packed.info["calib_pairs"] == 4 * 2  # 4 noises x steps {0, 5} of 10
    split_layers = [n for n in splits if n in packed.layers]
    assert split_layers and all(packed.layers[n]["act_scale"].numel() == 2 for n in split_layers)
    restored = method.restore(models.clone(trained[1]), packed.tensors(trained[1]), packed.metadata())
    sched, x = sampler.model_schedule(trained[1]), sampler.seeded_noise(2, 8, 0)
    a, b = (sampler.ddim_sample(m, x, sched, 2) for m in (restored.model, packed.model))
    assert torch.equal(a, b)
