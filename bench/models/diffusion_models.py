"""Loading diffusion models (kind `diffusion`): every one is a noise predictor `module(x_t, t) -> eps` plus the
facts a task needs in `info` (image side, channels, the DDPM schedule).

- `suite_trained`: a `bench.models.unet.TinyUNet` trained by the suite from the spec's `recipe`
  (`bench.diffusion.load_ddpm`: trained once, then read from `<results>/trained/`).
- `diffusers`: a `UNet2DModel` from a hub id or local directory (a DDPMPipeline folder's `unet/` subfolder
  is found too); its scheduler config, when present, gives the schedule. diffusers is an optional extra.
Parameters are rounded once to `storage_dtype`, as for every model of the suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bench.errors import ConfigError, DataMissing


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
        from diffusers import UNet2DModel
    except ImportError:
        raise DataMissing("model source 'diffusers' needs the diffusers package",
                          'install the extra: pip install -e ".[diffusion]"') from None
    path = spec.name_or_path
    sub = "unet" if Path(path, "unet").is_dir() or not Path(path).is_dir() and "/" in path and not Path(
        path, "config.json").exists() else None
    try:
        unet = UNet2DModel.from_pretrained(path, subfolder=sub, revision=spec.revision)
    except (OSError, EnvironmentError) as e:
        if sub is not None:  # a bare UNet repo/folder rather than a pipeline
            try:
                unet = UNet2DModel.from_pretrained(path, revision=spec.revision)
            except (OSError, EnvironmentError):
                raise DataMissing(f"cannot load diffusers UNet '{path}' ({str(e).splitlines()[0]})",
                                  "point model.name_or_path at a local pipeline/UNet directory or go online") from None
        else:
            raise DataMissing(f"cannot load diffusers UNet '{path}' ({str(e).splitlines()[0]})",
                              "point model.name_or_path at a local pipeline/UNet directory or go online") from None
    facts = _schedule_facts(1000, 1e-4, 0.02, "linear")
    sched_cfg = Path(path, "scheduler", "scheduler_config.json")
    if sched_cfg.is_file():
        c = json.loads(sched_cfg.read_text())
        facts = _schedule_facts(c.get("num_train_timesteps", 1000), c.get("beta_start", 1e-4),
                                c.get("beta_end", 0.02), c.get("beta_schedule", "linear"))
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return DiffusersUNet(unet.eval()), {"origin": path, "image_side": size, "channels": cfg.in_channels,
                                        "architecture": "diffusers.UNet2DModel", **facts}


def load_diffusion(spec):
    from bench import models

    if spec.source == "suite_trained":
        from bench.diffusion import DDPMRecipe, load_ddpm

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
    models.round_to_storage(module, models._DTYPES[spec.storage_dtype])
    adapter = models.adapter_for(module)
    info.update({"n_params": sum(p.numel() for p in module.parameters()), "n_blocks": 0,
                 "n_block_linear_weights": adapter.n_block_linear_weights()})
    return models.LoadedModel(spec, module, None, adapter, models.weights_sha256(module), info)
