"""The DDPM noise schedule and the deterministic DDIM sampler of the diffusion track, and the calibration inputs
methods take from it.

DDPM: linear betas 1e-4..0.02 over T = 1000 steps (Ho et al. 2020). DDIM (Song et al. 2021) with eta = 0 on
`steps` evenly spaced timesteps: deterministic given the initial noise, so a compressed and an uncompressed model
fed identical noise can be compared sample by sample. Calibration: the (x_t, t) the uncompressed model meets while
sampling from calibration noises (Q-Diffusion's and the FP-diffusion PTQ papers' data-free, timestep-spanning
set), and per layer the input rows its weight multiplies over those calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import ConfigError

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


class SampleAll(nn.Module):
    """The whole sampler from x_T as one module: what a backend times (and counts the MACs of) per image."""

    def __init__(self, model: nn.Module, schedule: Schedule, steps: int):
        super().__init__()
        self.model, self.schedule, self.steps = model, schedule, steps

    def forward(self, x_T: torch.Tensor) -> torch.Tensor:
        return ddim_sample(self.model, x_T, self.schedule, self.steps)


def model_schedule(model) -> Schedule:
    """The schedule of a loaded diffusion model (from its info)."""
    i = model.info
    return Schedule(i["timesteps"], i["beta_start"], i["beta_end"])


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


def calibration_inputs(model, calib, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t) met by the uncompressed `model` sampling `steps` DDIM steps from the calibration noises."""
    side, ch = model.info["image_side"], model.info["channels"]
    if calib is None or calib.windows.dim() != 4 or tuple(calib.windows.shape[1:]) != (ch, side, side):
        got = None if calib is None else tuple(calib.windows.shape[1:])
        raise ConfigError(f"diffusion calibration needs ({ch}, {side}, {side}) noise images, got {got}",
                          f"use calib=ddpm_noise{side} (source gaussian_noise, patch={side})")
    return trajectory_inputs(model.module, calib.windows, model_schedule(model), steps)


def heldout_inputs(model, calib, steps: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The same from the calibration set's held-out noises (a method's validation pairs), or None without any."""
    if calib is None or calib.heldout is None or not len(calib.heldout):
        return None
    return trajectory_inputs(model.module, calib.heldout, model_schedule(model), steps)


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
