"""`fid_*`: Frechet Inception Distance of an unconditional diffusion model's samples (the real path, for users
with the Inception weights and reference statistics on disk or online), computed with clean-fid's pieces:
its TorchScript Inception-v3 (`inception-2015-12-05.pt`, the translation of TF's FID network that
clean-fid and StyleGAN use; 2048-d pool features) and its "clean" resize (PIL bicubic on float32 channels
to 299 x 299, no quantization after resizing), then the Frechet distance of Heusel et al. (2017).

Protocol: `n_samples` images from seeded noise (`seed`), DDIM eta = 0 with `steps` steps; samples in
[-1, 1] are mapped to 0..255 and rounded to uint8 as saved images would be. Reference statistics (`mu`,
`sigma`) come from `reference_stats` (an .npz as clean-fid / pytorch-fid write them; a path, relative to the
data root unless absolute) and are named by `reference_name`. The metric is
`fid.clean_fid.<reference_name>.n<N>.ddim<steps>_eta0`; its notes record the implementation, the weights
file and its sha256.

FID is reported only when the features come from the real Inception weights: the extractor must be
clean-fid's `InceptionV3W` loaded from `inception_weights` (or downloaded by clean-fid to that folder when
online). Anything else is refused with one line; `extractor_override` (tests only) injects a stand-in whose
result is named `fd_<stand-in name>`, never `fid`. clean-fid is installed with `pip install --no-deps
clean-fid==0.1.35` (its declared torchvision would replace the CPU torch; the modules used here need
only torch, numpy and Pillow).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from bench import data as data_mod
from bench.errors import ConfigError, DataMissing
from bench.frechet import frechet_from_stats
from bench.metrics import Metric
from bench.plugins import Task, Workload
from bench.precision import fp32
from bench.sampler import SampleAll, ddim_sample, model_schedule, sampler_name, seeded_noise

INCEPTION_FILE = "inception-2015-12-05.pt"


def is_real_inception(extractor: nn.Module) -> bool:
    """clean-fid's wrapper around the TorchScript Inception weights file, and nothing else."""
    try:
        from cleanfid.inception_torchscript import InceptionV3W
    except ImportError:
        return False
    return isinstance(extractor, InceptionV3W) and isinstance(getattr(extractor, "base", None), torch.jit.ScriptModule)


def metric_name(extractor_name: str, real_inception: bool, reference: str, n: int, steps: int, claim_fid: bool) -> str:
    """`fid.*` only for the real Inception; a stand-in's distance is `fd_<name>.*`. Asking for the FID name
    with anything else is refused."""
    tail = f"{reference}.n{n}.{sampler_name(steps)}"
    if real_inception:
        return f"fid.clean_fid.{tail}"
    if claim_fid:
        raise ConfigError(f"refusing to report FID: the features come from '{extractor_name}', not the Inception-v3 "
                          f"weights ({INCEPTION_FILE})", "set task.inception_weights to the real weights file")
    return f"fd_{extractor_name}.{tail}"


@dataclass
class DiffusionFID(Task):
    name: str = "fid_cifar10"
    n_samples: int = 10000
    steps: int = 100
    seed: int = 1234
    batch: int = 50
    reference_stats: str = "fid_stats/cifar10_clean_train_32.npz"
    reference_name: str = "cifar10_train_clean"
    inception_weights: str | None = None  # folder or file of inception-2015-12-05.pt; null = clean-fid's /tmp
    download: bool = False  # let clean-fid download the weights when they are missing (online)
    limit: int | None = None
    applies_to = ("diffusion",)
    protocol_version = "fid-cleanfid-0.1.35-1"
    extractor_override: ClassVar[tuple[nn.Module, str] | None] = None  # tests only: (stand-in, its name)

    def __post_init__(self):
        if self.n_samples < 2:
            raise ConfigError(f"task.n_samples={self.n_samples} is too small for a covariance", "e.g. 10000")
        if not 1 <= self.steps <= 1000:
            raise ConfigError(f"task.steps={self.steps} must be in 1..1000", "e.g. task.steps=100")
        if self.limit is not None:
            raise ConfigError(f"{self.name} has no limit", "use task.n_samples to draw fewer samples")

    # --- the feature extractor -------------------------------------------------------------------------
    def extractor(self) -> tuple[nn.Module, str, dict]:
        if self.extractor_override is not None:
            module, name = self.extractor_override
            return module, name, {"extractor": name, "real_inception": False}
        try:
            from cleanfid.inception_torchscript import InceptionV3W
        except ImportError:
            raise DataMissing("task fid_* needs clean-fid", "pip install --no-deps clean-fid==0.1.35") from None
        path = Path(self.inception_weights or "/tmp")
        folder = path.parent if path.suffix == ".pt" else path
        weights = folder / INCEPTION_FILE
        if not weights.is_file() and not self.download:
            raise DataMissing(f"Inception weights {weights} are missing",
                              "set task.inception_weights=<folder or file> or task.download=true (online)")
        module = InceptionV3W(str(folder), download=self.download, resize_inside=False).eval()
        sha = hashlib.sha256(weights.read_bytes()).hexdigest()
        return module, "inception_v3_2015_12_05", {"extractor": str(weights), "extractor_sha256": sha,
                                                   "real_inception": is_real_inception(module)}

    def reference(self, data_root: str | None) -> tuple[np.ndarray, np.ndarray]:
        p = Path(self.reference_stats)
        if not p.is_absolute():
            local = data_mod.local_file(self.reference_stats, data_root)
            if local is None:
                raise data_mod.missing(self.reference_stats, data_root)
            p = local
        if not p.is_file():
            raise DataMissing(f"reference statistics {p} are missing",
                              "set task.reference_stats to an .npz (mu, sigma)")
        with np.load(p) as z:
            return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)

    @torch.no_grad()
    def features(self, extractor: nn.Module, images_uint8: np.ndarray) -> np.ndarray:
        """clean-fid's clean resize to 299 x 299 (float, no re-quantization), then the extractor on 0..255."""
        from cleanfid.resize import make_resizer

        resize = make_resizer("PIL", False, "bicubic", (299, 299))
        out = []
        for s in range(0, len(images_uint8), self.batch):
            batch = [resize(img) for img in images_uint8[s:s + self.batch]]
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float()
            with fp32():  # the measuring instrument computes the same at every run precision
                out.append(extractor(x).reshape(x.shape[0], -1).double().numpy())
        return np.concatenate(out)

    # --- evaluate ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, data_root: str | None = None) -> list[Metric]:
        extractor, ext_name, facts = self.extractor()
        real = facts["real_inception"]
        name = metric_name(ext_name, real, self.reference_name, self.n_samples, self.steps,
                           claim_fid=self.extractor_override is None)
        mu_r, sigma_r = self.reference(data_root)
        side, ch = model.info["image_side"], model.info["channels"]
        x_T = seeded_noise(self.n_samples, side, self.seed, ch)
        samples = ddim_sample(model.module, x_T, model_schedule(model), self.steps)
        imgs = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        if imgs.shape[-1] == 1:
            imgs = np.repeat(imgs, 3, axis=-1)
        f = self.features(extractor, imgs)
        if f.shape[1] != mu_r.shape[0]:
            raise ConfigError(f"features are {f.shape[1]}-d, the reference statistics {mu_r.shape[0]}-d",
                              "use reference statistics computed with the same extractor")
        value = frechet_from_stats(f.mean(0), np.cov(f, rowvar=False), mu_r, sigma_r)
        notes = {"implementation": "clean-fid 0.1.35 resize (PIL bicubic, float) + TorchScript Inception-v3",
                 "sampler": sampler_name(self.steps), "n": self.n_samples, "noise_seed": self.seed,
                 "reference": f"{self.reference_name} ({self.reference_stats})", **facts}
        return [Metric(name, value, "lower", notes=notes)]

    def workload(self, model, data_root: str | None = None) -> Workload:
        x = seeded_noise(1, model.info["image_side"], self.seed, model.info["channels"])
        sched = model_schedule(model)
        return Workload(kind="diffusion", inputs=x, label=f"{sampler_name(self.steps)}_1img",
                        steps=self.steps, sampler=lambda module: SampleAll(module, sched, self.steps))
