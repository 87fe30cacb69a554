"""`sr_set5`, `sr_set14`, `sr`: single-image super-resolution quality with the protocol of the efficient-SR
literature (RLFN, IMDN, NTIRE 2022 ESR).

Protocol: each HR image is cropped to a multiple of the scale; the LR input is the standard MATLAB-bicubic
file shipped with the set (`LR_bicubic/X<s>/<name>x<s>.png`, what every paper evaluates); the model's output
is clamped and rounded to uint8 as a saved image would be; then
- `psnr_y` and `ssim_y`: on the Y channel (MATLAB rgb2ycbcr) with a border of `border` pixels (default: the
  scale) cropped, the numbers papers report;
- `psnr_rgb`: on the three RGB channels with the same border, as NTIRE 2022 ESR scores.
Metric names carry set, scale, measure and border, e.g. `set5.x4.psnr_y.b4` (`.firstN` with `limit`).
Cost, for one 256 x 256 LR input as NTIRE 2022 ESR counts it: multiply-accumulates counted by hooks
(`cost.macs.lr256`, what NTIRE reports as FLOPs), activations (`cost.conv_activations.lr256`: elements of every
conv output, the challenge's "#Acts" as ofsoundof/NTIRE2022_ESR utils/model_summary.py defines it, written anew),
conv outputs counted (`cost.conv_calls.lr256`, its "#Conv") and parameters (`cost.params`). The challenge's fifth
number, runtime, is the hardware backend's latency of the same 256 x 256 workload (e.g. `hardware=cpu`).
Per-image values are kept for paired comparisons.
The hardware workload is one seeded 256 x 256 LR input in the model's input range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bench import data, image
from bench.errors import ConfigError
from bench.metrics import Metric
from bench.plugins import Task, Workload

SETS = ("Set5", "Set14")


@dataclass
class SuperResolution(Task):
    name: str = "sr_set5"
    sets: list[str] = field(default_factory=lambda: ["Set5"])
    scale: int = 4
    border: int | None = None  # pixels cropped on each side before scoring; None = the scale
    limit: int | None = None
    cost_lr_size: int = 256  # LR side of the input the cost and the hardware workload use
    applies_to = ("image_sr",)
    protocol_version = "sr-matlab-lr-1"

    def __post_init__(self):
        for s in self.sets:
            if s not in SETS:
                raise ConfigError(f"task.sets has unknown set '{s}'", f"use some of: {', '.join(SETS)}")
        if self.scale not in (2, 3, 4, 8):
            raise ConfigError(f"task.scale={self.scale} has no LR files", "use 2, 3, 4 or 8")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"task.limit={self.limit} must be positive or null", "drop it for the whole set")

    @property
    def crop(self) -> int:
        return self.scale if self.border is None else self.border

    def check_applicable(self, model) -> None:
        super().check_applicable(model)
        if model.info.get("scale") != self.scale:
            raise ConfigError(f"model '{model.spec.name}' upscales x{model.info.get('scale')}, the task is "
                              f"x{self.scale}", f"set task.scale={model.info.get('scale')} or pick another model")

    def pairs(self, set_name: str, data_root: str | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(name, LR uint8, HR uint8 cropped to a multiple of the scale) of a set, in file-name order."""
        root = data.data_root(data_root)
        hr_dir = f"sr_testsets/{set_name}/HR"
        if root is None or not (root / hr_dir).is_dir():
            raise data.missing(hr_dir, data_root)
        names = sorted(p.stem for p in (root / hr_dir).glob("*.png"))[: self.limit]
        out = []
        for n in names:
            hr = image.load_rgb(root / hr_dir / f"{n}.png")
            lr = image.load_rgb(root / f"sr_testsets/{set_name}/LR_bicubic/X{self.scale}/{n}x{self.scale}.png")
            h, w = lr.shape[0] * self.scale, lr.shape[1] * self.scale
            if hr.shape[0] // self.scale * self.scale != h or hr.shape[1] // self.scale * self.scale != w:
                raise ConfigError(f"{set_name}/{n}: LR {lr.shape[:2]} is not HR {hr.shape[:2]} / {self.scale}",
                                  "the LR files do not belong to these HR images; restore the set")
            out.append((n, lr, hr[:h, :w]))
        return out

    @torch.no_grad()
    def upscale(self, model, lr: np.ndarray) -> np.ndarray:
        rng = model.info["input_range"]
        x = torch.from_numpy(lr).permute(2, 0, 1)[None].float() * (rng / 255.0)
        y = model.module(x)[0].float().clamp(0, rng) * (255.0 / rng)
        return y.round().permute(1, 2, 0).to(torch.uint8).numpy()

    def evaluate(self, model, data_root: str | None = None) -> list[Metric]:
        metrics: list[Metric] = []
        lim, b = self.limit_tag(), self.crop
        for set_name in self.sets:
            rows = []
            for _name, lr, hr in self.pairs(set_name, data_root):
                sr = self.upscale(model, lr)
                y_sr, y_hr = image.rgb_to_y(sr), image.rgb_to_y(hr)
                rows.append((image.psnr(y_sr, y_hr, b), image.ssim(y_sr, y_hr, b), image.psnr(sr, hr, b)))
            prefix = f"{set_name.lower()}.x{self.scale}"
            for i, (measure, unit) in enumerate((("psnr_y", "dB"), ("ssim_y", ""), ("psnr_rgb", "dB"))):
                vals = [r[i] for r in rows]
                metrics.append(Metric(f"{prefix}.{measure}.b{b}{lim}", float(np.mean(vals)), "higher", unit,
                                      per_sample=vals, per_sample_name=f"image_{measure}"))
        x, lr = self._cost_input(model), f"lr{self.cost_lr_size}"
        metrics.append(Metric(f"cost.macs.{lr}", float(image.count_macs(model.module, x)), "lower",
                              "MAC", notes={"counted": "forward hooks on Conv2d/Linear"}))
        acts, convs = image.count_conv_activations(model.module, x)
        counted = "forward hooks on Conv2d/ConvTranspose2d, NTIRE2022_ESR utils/model_summary.py's definition"
        metrics.append(Metric(f"cost.conv_activations.{lr}", float(acts), "lower", "element",
                              notes={"counted": f"elements of every conv output: {counted}"}))
        metrics.append(Metric(f"cost.conv_calls.{lr}", float(convs), "lower", "",
                              notes={"counted": f"conv outputs counted (NTIRE's #Conv): {counted}"}))
        metrics.append(Metric("cost.params", float(sum(p.numel() for p in model.module.parameters())), "lower"))
        return metrics

    def _cost_input(self, model) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        n = self.cost_lr_size
        return torch.rand((1, 3, n, n), generator=g) * model.info["input_range"]

    def workload(self, model, data_root: str | None = None) -> Workload:
        return Workload(kind="image", inputs=self._cost_input(model),
                        label=f"sr_x{self.scale}_lr{self.cost_lr_size}")
