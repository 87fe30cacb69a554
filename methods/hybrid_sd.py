"""`hybrid_sd`: step-level hybrid inference, after Zhu et al., "Hybrid SD: Edge-Cloud Collaborative Inference
for Stable Diffusion Models" (arXiv 2408.06646, 2024): the early denoising steps, which lay out the image's
semantics, run on the large model; the late steps, which refine detail, run on a small model.

Here the large model is the run's model and the small one a second DDPM the suite trains from its own
recipe (`small_model`, a model config name; default `ddpm_digits_small`: the same data, schedule and
training, a quarter of the MACs). The split is set in sampler steps: of `total_steps` DDIM steps the first
`large_steps` run on the large model and the rest on the small one, i.e. every timestep t below the
(large_steps)-th DDIM timestep goes to the small model (a timestep threshold, so any caller of the
denoiser sees the same switch). A task sampling with another step count still switches at that timestep.
Both models are stored (the large one's layers at fp16 as the block linears, the small one as other
parameters); nothing is quantized. Execution: dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bench import diffusion
from bench.errors import ConfigError, check_range
from bench.packed import EXECUTION_DENSE, Packed
from bench.plugins import Method


@dataclass
class HybridSD(Method):
    name: str = "hybrid_sd"
    small_model: str = "ddpm_digits_small"
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

    def switch_t(self, model) -> int:
        """Timesteps below this run on the small model."""
        ts = diffusion.model_schedule(model).ddim_timesteps(self.total_steps)
        return ts[self.large_steps - 1] if self.large_steps > 0 else model.info["timesteps"] + 1

    def _attach(self, model) -> dict:
        from bench import models

        if not hasattr(model.module, "late"):
            raise ConfigError(f"hybrid_sd needs a suite-trained TinyUNet, model '{model.spec.name}' is not",
                              "use model=ddpm_digits")
        spec = diffusion.load_model_config(self.small_model, model.spec.results)
        small = models.load(spec)
        for key in ("image_side", "channels", "timesteps", "beta_start", "beta_end"):
            if small.info[key] != model.info[key]:
                raise ConfigError(f"small model '{self.small_model}' has {key}={small.info[key]}, the large model "
                                  f"{model.info[key]}", "both models must share image size and noise schedule")
        model.module.late = small.module
        model.module.late_below_t = self.switch_t(model)
        return {"small_params": small.info["n_params"], "small_weights_sha256": small.weights_sha256,
                "small_train_seconds": small.info.get("train_seconds")}

    def compress(self, model, calib, budget) -> Packed:
        facts = self._attach(model)
        packed = Packed(model.module, self.name, self.execution)
        packed.info.update({"small_params": facts["small_params"], "switch_below_t": model.module.late_below_t,
                            "large_steps": self.large_steps, "total_steps": self.total_steps,
                            "small_step_fraction": 1 - self.large_steps / self.total_steps})
        if facts["small_train_seconds"] is not None:
            packed.info["small_train_seconds"] = facts["small_train_seconds"]
        packed.extra_metadata["small_weights_sha256"] = facts["small_weights_sha256"]
        return packed

    def restore(self, model, tensors, metadata) -> Packed:
        facts = self._attach(model)
        if metadata.get("small_weights_sha256") != facts["small_weights_sha256"]:
            from bench.errors import ArtifactCorrupt

            raise ArtifactCorrupt("the cached hybrid holds another small model", "it will be rebuilt")
        return super().restore(model, tensors, metadata)
