"""`fd_digits`: sample quality of an unconditional diffusion model trained on real 8x8 digits, offline, with
a Frechet distance in the features of a classifier the suite trains on the same data (`fd_lenet`) and
teacher-fidelity measures that need no feature extractor. Never called FID: FID is defined on
Inception-v3 pool features of ImageNet-trained weights, which this task does not use.

Protocol:
- `n_samples` images from seeded Gaussian noise (`seed`), DDIM with eta = 0 on `steps` evenly spaced
  timesteps (deterministic: identical noise gives identical samples from identical weights).
- `fd_lenet`: Frechet distance (Heusel et al. 2017's formula) between the LeNet penultimate (84-d)
  features of the samples and of the reference set (`reference`: all 1797 real images of the dataset the
  model was trained on). The LeNet is trained by the suite (bench.ClassifierRecipe), cached by
  content hash; its held-out top-1 is recorded beside it, and so is (in the notes) the distance of a seeded
  subset of as many real images to the same reference: what real digits score at this N (they are part of
  the reference, so it is a point of comparison, not a bound).
- Teacher fidelity: the same noise through the uncompressed model (the base weights the run started from,
  reloaded from the model spec, its samples cached by weights sha256): per-sample MSE and PSNR of the
  images on the [0, 1] pixel scale. PSNR of identical images is infinite; it is capped at 100 dB and the
  metric name says so.
Names carry dataset, extractor, N, sampler, steps and reference, e.g.
`digits8.fd_lenet.n512.ddim50_eta0.ref_all1797`. A grid of the first 256 samples is saved as an artifact.
The hardware workload is one image sampled with the same sampler and steps (latency per image and per step).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench import models, precision
from bench.cache import content_key
from bench.errors import ConfigError
from bench.frechet import frechet_distance
from bench.image import count_macs, save_grid
from bench.image_sets import DATASETS
from bench.metrics import Metric
from bench.models.digits import ClassifierRecipe, load_classifier
from bench.models.suite_training import trained_store
from bench.plugins import Task, Workload
from bench.sampler import SampleAll, Schedule, ddim_sample, sampler_name, seeded_noise

PSNR_CAP_DB = 100.0


@dataclass
class DigitsFrechet(Task):
    name: str = "fd_digits"
    n_samples: int = 512
    steps: int = 50
    seed: int = 1234  # of the initial noise (fixed across methods: teacher fidelity pairs samples by it)
    reference: str = "all"  # the real images the features are compared with
    extractor: dict = field(default_factory=lambda: {"epochs": 30, "batch_size": 64, "lr": 1e-3, "seed": 0})
    grid: int = 256
    limit: int | None = None
    applies_to = ("diffusion",)
    protocol_version = "fd-lenet-ddim-1"

    def __post_init__(self):
        if self.n_samples < 2:
            raise ConfigError(f"task.n_samples={self.n_samples} is too small for a covariance", "use >= 100")
        if not 1 <= self.steps <= 1000:
            raise ConfigError(f"task.steps={self.steps} must be in 1..1000", "e.g. task.steps=50")
        if self.reference != "all":
            raise ConfigError(f"task.reference={self.reference} is unknown", "use 'all' (every real image)")
        if self.limit is not None:
            raise ConfigError("fd_digits has no limit", "use task.n_samples to draw fewer samples")

    def check_applicable(self, model) -> None:
        super().check_applicable(model)
        if model.info.get("dataset") not in DATASETS:
            raise ConfigError(f"model '{model.spec.name}' was not trained on a dataset the suite ships",
                              f"fd_digits compares with {', '.join(DATASETS)}; use task=fid_* for others")

    # --- pieces -------------------------------------------------------------------------------------------
    def _schedule(self, model) -> Schedule:
        i = model.info
        return Schedule(i["timesteps"], i["beta_start"], i["beta_end"])

    def _noise(self, model) -> torch.Tensor:
        return seeded_noise(self.n_samples, model.info["image_side"], self.seed, model.info["channels"])

    def sample(self, model) -> torch.Tensor:
        return ddim_sample(model.module, self._noise(model), self._schedule(model), self.steps)

    def teacher_samples(self, model) -> torch.Tensor:
        """The uncompressed model's samples from the same noise (cached by base weights + protocol)."""
        store = trained_store(model.spec.results)
        # sampled in the run's precision, like the student's samples they are paired with
        key = content_key("teacher_samples", model.weights_sha256, self.n_samples, self.steps, self.seed,
                          self.protocol_version, *([] if precision.active() == "fp32" else [precision.active()]))
        if store.has(key):
            return store.load(key)[0]["samples"]
        base = models.load(model.spec)
        if base.weights_sha256 != model.weights_sha256:
            raise ConfigError(f"model '{model.spec.name}' reloads with other weights than this run started from",
                              "the teacher must be the run's own base model")
        out = ddim_sample(base.module, self._noise(base), self._schedule(base), self.steps)
        store.save(key, {"samples": out.contiguous()}, {"what": "teacher samples"})
        return out

    def extractor_model(self, model):
        recipe = ClassifierRecipe(dataset=model.info["dataset"], **self.extractor)
        return load_classifier(recipe, model.spec.results)

    @property
    def tag(self) -> str:
        return f"n{self.n_samples}.{sampler_name(self.steps)}"

    # --- evaluate -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, data_root: str | None = None) -> list[Metric]:
        samples = self.sample(model)
        teacher = self.teacher_samples(model)
        samples, teacher = samples.float(), teacher.float()
        with precision.fp32():  # the measuring instrument (its training, if not cached, too) is the same at every precision
            lenet, lrec, data = self.extractor_model(model)
            f_s = lenet.features(samples.clamp(-1, 1)).double().numpy()
            f_r = lenet.features(data.images).double().numpy()
            probs = torch.softmax(lenet(samples.clamp(-1, 1)), dim=1)
        ds = f"digits{data.side}" if data.name == "sklearn_digits" else f"mnist{data.side}"
        ref = f"ref_{self.reference}{data.images.shape[0]}"
        fd = frechet_distance(f_s, f_r)
        # context for the number: a seeded subset of as many real images scores this against the same reference
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(f_r), generator=g)[:min(self.n_samples, len(f_r))].numpy()
        floor = frechet_distance(f_r[idx], f_r)
        # teacher fidelity on the [0, 1] pixel scale
        a, b = (samples.clamp(-1, 1) + 1) / 2, (teacher.clamp(-1, 1) + 1) / 2
        mse = (a - b).pow(2).flatten(1).mean(1).double()
        psnr = [min(PSNR_CAP_DB, 10 * math.log10(1.0 / m)) if m > 0 else PSNR_CAP_DB for m in mse.tolist()]
        common = {"sampler": sampler_name(self.steps), "n": self.n_samples, "noise_seed": self.seed,
                  "dataset": data.source}
        metrics = [
            Metric(f"{ds}.fd_lenet.{self.tag}.{ref}", fd, "lower",
                   notes={**common, "extractor": "LeNet-5 trained by the suite, 84-d penultimate ReLU features",
                          "extractor_heldout_top1": lrec.get("heldout_top1"), "reference": ref,
                          "real_subset_same_n_fd": floor,
                          "not": "FID (no Inception-v3 features)"}),
            Metric(f"{ds}.teacher_mse.{self.tag}", float(mse.mean()), "lower", "pixel^2 on [0,1]",
                   stderr=float(mse.std(unbiased=True) / math.sqrt(len(mse))), per_sample=mse.tolist(),
                   per_sample_name="image_mse_vs_uncompressed", notes=common),
            Metric(f"{ds}.teacher_psnr.{self.tag}.cap{int(PSNR_CAP_DB)}db", float(np.mean(psnr)), "higher", "dB",
                   per_sample=psnr, per_sample_name="image_psnr_vs_uncompressed", notes=common),
            Metric(f"extractor.lenet.heldout_top1.{ds}", float(lrec.get("heldout_top1", float("nan"))), "higher",
                   notes={"split": "seeded 80/20 of the dataset", "n_heldout": lrec.get("n_heldout")}),
        ]
        # the classifier's view of the samples: how often it is sure which digit it sees
        conf = probs.max(1).values
        metrics.append(Metric(f"{ds}.lenet_confident_frac.p0.9.{self.tag}", float((conf > 0.9).float().mean()),
                              "higher", per_sample=conf.tolist(), per_sample_name="lenet_max_prob"))
        # counted over a whole sampling run: a hybrid model's steps differ in cost
        sampler = SampleAll(model.module, self._schedule(model), self.steps)
        per_image = count_macs(sampler, self._noise(model)[:1])
        metrics.append(Metric(f"cost.macs.per_image.{sampler_name(self.steps)}", float(per_image), "lower",
                              "MAC"))
        metrics.append(Metric("cost.macs.per_denoiser_call_mean", float(per_image / self.steps), "lower", "MAC"))
        metrics.append(Metric("cost.params", float(sum(p.numel() for p in model.module.parameters())), "lower"))
        out = Path(tempfile.mkdtemp(prefix="bench_grid_")) / "samples_grid.png"
        save_grid(samples[:self.grid], out)
        self.artifact_files = [str(out)]
        return metrics

    def workload(self, model, data_root: str | None = None) -> Workload:
        x = seeded_noise(1, model.info["image_side"], self.seed, model.info["channels"])
        return Workload(kind="diffusion", inputs=x, label=f"{sampler_name(self.steps)}_1img",
                        steps=self.steps,
                        sampler=lambda module: SampleAll(module, self._schedule(model), self.steps))

