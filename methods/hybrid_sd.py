"""`hybrid_sd`: step-level hybrid inference, after Zhu et al., "Hybrid SD: Edge-Cloud Collaborative Inference
for Stable Diffusion Models" (arXiv 2408.06646, 2024): the early denoising steps, which lay out the image's
semantics, run on the large model; the late steps, which refine detail, run on a small model.

Here the large model is the run's model and the small one a second DDPM the suite trains from its own
recipe (`small_model`, a model config composed by Hydra from configs/model/; default `ddpm_digits_small`: the
same data, schedule and training, a quarter of the MACs). The split is set in sampler steps: of `total_steps`
DDIM steps the first `large_steps` run on the large model and the rest on the small one, i.e. every timestep t
below the (large_steps)-th DDIM timestep goes to the small model (a timestep threshold, so any caller of the
denoiser sees the same switch). A task sampling with another step count still switches at that timestep.
The two models run inside `HybridDenoiser`, which routes each timestep. Both models are stored (the large one's
layers at fp16 as the block linears, the small one as other parameters); nothing is quantized. Execution: dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench import models
from bench.errors import ArtifactCorrupt, ConfigError, check_range
from bench.models import ModelSpec
from bench.packed import EXECUTION_DENSE, Packed
from bench.plugins import Method
from bench.sampler import model_schedule


class HybridDenoiser(nn.Module):
    """eps(x, t) from the large denoiser for t >= late_below_t and from `late`, the small one, below. The large
    model's layers are this module's own children, so they keep their names (the artifact's block linears) and
    its adapter lists them; `late` is stored whole."""

    def __init__(self, large: nn.Module, late: nn.Module, late_below_t: int):
        super().__init__()
        for name, child in large.named_children():
            self.add_module(name, child)
        self.late, self.late_below_t = late, late_below_t
        self.__dict__["large"] = large  # runs the large model's forward; not a submodule (its children are ours)
        self.bench_kind = large.bench_kind

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0]) if torch.as_tensor(t).numel() == 1 else t
        small = t < self.late_below_t
        if bool(small.all()):
            return self.late(x, t)
        if not bool(small.any()):
            return self.large(x, t)
        out = torch.empty_like(x)
        out[small] = self.late(x[small], t[small])
        out[~small] = self.large(x[~small], t[~small])
        return out


@dataclass
class HybridSD(Method):
    name: str = "hybrid_sd"
    small_model: ModelSpec | None = None  # composed from configs/model/ by the method YAML's defaults
    large_steps: int = 25
    total_steps: int = 50
    family: ClassVar[str] = "hybrid-inference"
    paper: ClassVar[str] = ("Zhu et al., Hybrid SD: Edge-Cloud Collaborative Inference for Stable Diffusion Models "
                            "(2024)")
    applies_to: ClassVar[tuple[str, ...]] = ("diffusion",)
    execution: ClassVar[str] = EXECUTION_DENSE

    def __post_init__(self):
        check_range("method.total_steps", self.total_steps, 1, 1000)
        check_range("method.large_steps", self.large_steps, 0, self.total_steps)
        if not isinstance(self.small_model, ModelSpec):
            raise ConfigError("method.small_model is not a model config",
                              "select one with model@method.small_model=ddpm_digits_small")

    def switch_t(self, model) -> int:
        """Timesteps below this run on the small model."""
        ts = model_schedule(model).ddim_timesteps(self.total_steps)
        return ts[self.large_steps - 1] if self.large_steps > 0 else model.info["timesteps"] + 1

    def _hybrid(self, model) -> tuple[HybridDenoiser, models.LoadedModel]:
        small = models.load(self.small_model)
        for key in ("image_side", "channels", "timesteps", "beta_start", "beta_end"):
            if small.info[key] != model.info[key]:
                raise ConfigError(f"small model '{small.spec.name}' has {key}={small.info[key]}, the large model "
                                  f"{model.info[key]}", "both models must share image size and noise schedule")
        return HybridDenoiser(model.module, small.module, self.switch_t(model)), small

    def compress(self, model, calib, budget) -> Packed:
        hybrid, small = self._hybrid(model)
        packed = Packed(hybrid, self.name, self.execution)
        packed.info.update({"small_params": small.info["n_params"], "switch_below_t": hybrid.late_below_t,
                            "large_steps": self.large_steps, "total_steps": self.total_steps,
                            "small_step_fraction": 1 - self.large_steps / self.total_steps})
        if small.info.get("train_seconds") is not None:
            packed.info["small_train_seconds"] = small.info["train_seconds"]
        packed.extra_metadata["small_weights_sha256"] = small.weights_sha256
        return packed

    def restore(self, model, tensors, metadata) -> Packed:
        hybrid, small = self._hybrid(model)
        if metadata.get("small_weights_sha256") != small.weights_sha256:
            raise ArtifactCorrupt("the cached hybrid holds another small model", "it will be rebuilt")
        return super().restore(models.with_module(model, hybrid), tensors, metadata)
