"""Loading diffusion models (kind `diffusion`): every one is a noise predictor `module(x_t, t) -> eps` plus the
facts a task needs in `info` (image side, channels, the DDPM schedule).

- `suite_trained`: a `bench.models.unet.TinyUNet` trained by the suite from the spec's `recipe`
  (`bench.models.ddpm.load_ddpm`: trained once, then read from `<results>/trained/`).
- `diffusers`: a `UNet2DModel` from a hub id or local directory (a DDPMPipeline folder's `unet/` subfolder
  is found too); its scheduler config, when present, gives the schedule (diffusers==0.42.1 is pinned).
Parameters are rounded once to `storage_dtype`, as for every model of the suite.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bench.errors import ConfigError, DataMissing
from bench.models.ddpm import DDPMRecipe, load_ddpm


class DiffusersUNet(nn.Module):
    """A diffusers UNet2DModel seen as `eps = module(x, t)`; its Conv2d/Linear layers stay addressable."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def _schedule_facts(timesteps: int, beta_start: float, beta_end: float, schedule: str) -> dict:
    return {"timesteps": timesteps, "beta_start": beta_start, "beta_end": beta_end, "beta_schedule": schedule}


def build_diffusers_unet(config: dict) -> nn.Module:
    """A randomly initialised UNet2DModel from a config dict (tests; no download)."""
    from diffusers import UNet2DModel

    return DiffusersUNet(UNet2DModel(**config))


def _load_diffusers(spec) -> tuple[nn.Module, dict]:
    try:
        from diffusers import DDPMScheduler, UNet2DModel
    except ImportError:
        raise DataMissing("model source 'diffusers' needs the diffusers package",
                          "pip install diffusers==0.42.1 (or ./install.sh)") from None
    path = spec.name_or_path
    local = Path(path).is_dir()
    if not local and path.startswith(("/", "./", "../", "~")):
        raise DataMissing(f"model directory '{path}' does not exist", "check model.name_or_path")
    # a pipeline keeps its UNet in unet/ (e.g. a saved DDPMPipeline); a bare UNet repo at its root
    subfolders = ["unet", None] if not local or Path(path, "unet").is_dir() else [None]
    unet, error = None, None
    for sub in subfolders:
        try:
            unet = UNet2DModel.from_pretrained(path, subfolder=sub, revision=spec.revision)
            break
        except (OSError, ValueError) as e:
            error = e
    if unet is None:
        raise DataMissing(f"cannot load a diffusers UNet2DModel from '{path}' ({str(error).splitlines()[0]})",
                          "point model.name_or_path at a local pipeline/UNet directory or go online") from None
    facts = {**_schedule_facts(1000, 1e-4, 0.02, "linear"), "schedule_source": "default (no scheduler config)"}
    for sub in ("scheduler", None):
        try:
            c = DDPMScheduler.from_pretrained(path, subfolder=sub, revision=spec.revision).config
        except (OSError, ValueError):
            continue
        facts = {**_schedule_facts(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule),
                 "schedule_source": f"{path}/{sub or '.'} scheduler config"}
        break
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return DiffusersUNet(unet.eval()), {"origin": path, "image_side": size, "channels": cfg.in_channels,
                                        "architecture": "diffusers.UNet2DModel", **facts}


def load_diffusion(spec) -> tuple[nn.Module, dict]:
    """The denoiser of `spec` (the caller rounds it to storage and wraps it) and its facts."""
    if spec.source == "suite_trained":
        recipe = DDPMRecipe(**(spec.recipe or {}))
        module, record, data = load_ddpm(recipe, spec.results)
        info = {"architecture": "TinyUNet", "image_side": data.side, "channels": 1, "dataset": data.name,
                "dataset_source": data.source, "data_sha256": data.sha256, "n_train_images": data.images.shape[0],
                "train_seconds": record.get("train_seconds"), "train_cache": record.get("cache"),
                "train_record": record, **_schedule_facts(recipe.timesteps, 1e-4, 0.02, "linear")}
    elif spec.source == "diffusers":
        module, info = _load_diffusers(spec)
        if info["beta_schedule"] != "linear":
            raise ConfigError(f"model '{spec.name}' uses beta_schedule={info['beta_schedule']}",
                              "the suite's DDIM sampler implements the linear DDPM schedule only")
    else:
        raise ConfigError(f"model.source={spec.source} is not a diffusion source", "use suite_trained or diffusers")
    module.eval()
    module.bench_kind = "diffusion"
    return module, info
