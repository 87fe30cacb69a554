"""The DDPM the suite trains itself (model source `suite_trained`): its recipe and its training.

Epsilon-prediction training with the simple MSE loss (Ho et al. 2020) on a TinyUNet (bench/models/unet.py); AdamW,
an EMA of the weights (decay 0.999) is the trained model, as in the reference DDPM. Cached by
bench/models/suite_training.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import ConfigError, unknown_choice
from bench.image_sets import DATASETS, ImageSet, load_images
from bench.models import unet
from bench.models.suite_training import cached_train
from bench.sampler import Schedule
from bench.training import Trainer, warmup_cosine

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
            raise unknown_choice("recipe.dataset", self.dataset, list(DATASETS))
        for key in ("ch", "n_res", "timesteps", "train_steps", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"recipe.{key}={getattr(self, key)} must be positive", f"set recipe.{key}>0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"recipe.ema_decay={self.ema_decay} must be in [0, 1)", "e.g. 0.999")

    def build(self) -> nn.Module:
        return unet.TinyUNet(1, self.ch, self.mults, self.n_res)


def train_ddpm(recipe: DDPMRecipe, data: ImageSet, threads: int | None = None) -> tuple[nn.Module, dict]:
    """Epsilon-prediction training with the simple loss (bench.training's loop, gradients clipped at norm 1, an
    EMA of the weights after each step); returns the EMA model and the record."""
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    model = recipe.build()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    sched = Schedule(recipe.timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    n = data.images.shape[0]

    def step_fn(_step):
        idx = torch.randint(0, n, (recipe.batch_size,), generator=g)
        x0 = data.images[idx]
        t = torch.randint(0, sched.T, (recipe.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        return F.mse_loss(model(sched.noise(x0, t, eps), t), eps), {}

    @torch.no_grad()
    def update_ema(step):
        d = min(recipe.ema_decay, (1 + step) / (10 + step))  # EMA warm-up, as the reference DDPM code
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.mul_(d).add_(pm.detach(), alpha=1 - d)

    steps = recipe.train_steps
    record = Trainer("ddpm training", opt, steps, warmup_cosine(max(1, steps // 50), steps), samples_per_step=
                     recipe.batch_size, train_samples=n, clip_grad_norm=1.0, after_step=update_ema,
                     progress=False).run(step_fn)
    losses = record.losses
    k = max(1, min(100, len(losses) // 10))
    return ema, {"train_seconds": record.seconds, "train_steps": steps,
                 "train_loss_first": sum(losses[:k]) / k, "train_loss_last": sum(losses[-k:]) / k,
                 "threads": torch.get_num_threads()}


def load_ddpm(recipe: DDPMRecipe, cache_dir: str | None) -> tuple[nn.Module, dict, ImageSet]:
    data = load_images(recipe.dataset)
    # the source that training runs: data, schedule, training loop and the network
    code = (load_images, train_ddpm, Schedule, warmup_cosine, Trainer, unet.TinyUNet, unet.ResBlock,
            unet.timestep_embedding, unet._norm)
    model, record = cached_train("ddpm", recipe, data, cache_dir, train_ddpm, recipe.build, code)
    return model, record, data
