"""`digits_top1`: top-1 accuracy of a digits classifier on the held-out split of scikit-learn's `load_digits`.

Protocol: the 1797 real 8x8 digits of `load_digits` (UCI optdigits, 17 grey levels), scaled to [-1, 1]
(raw / 8 - 1, the convention the suite's digits models are trained with); the held-out 20% of a seeded
permutation (`split_seed`, the classifier recipe's seed: `bench.image_sets.heldout_split`), 360 images.
The task refuses a model trained under another split seed (it would be scored on its own training images).
Metric `digits8x8.top1.heldout` (`.firstN` with `limit`), per-image correctness kept for paired comparisons;
cost: MACs of one 8x8 image and parameters. The hardware workload is the first held-out image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench import image
from bench.errors import ConfigError
from bench.image_sets import heldout_split, load_images
from bench.metrics import Metric
from bench.plugins import Task, Workload


@dataclass
class DigitsTop1(Task):
    name: str = "digits_top1"
    dataset: str = "sklearn_digits"
    split_seed: int = 0
    batch_size: int = 128
    limit: int | None = None
    applies_to = ("image_classifier",)
    protocol_version = "digits-heldout-1"

    def __post_init__(self):
        if self.dataset != "sklearn_digits":
            raise ConfigError(f"task.dataset='{self.dataset}' is not supported", "use sklearn_digits")
        for key in ("batch_size", "limit"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"task.{key}={value} must be positive", "or null for the default")

    def heldout(self, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out images (n, 1, 8, 8) in [-1, 1] and labels, first `limit` only."""
        trained = (model.info.get("split_seed") if model is not None else None)
        if trained is not None and trained != self.split_seed:
            raise ConfigError(f"model '{model.spec.name}' was trained with split seed {trained}, the task holds out "
                              f"by split_seed={self.split_seed}", f"set task.split_seed={trained}")
        data = load_images(self.dataset)
        _, held = heldout_split(data.images.shape[0], torch.Generator().manual_seed(self.split_seed))
        held = held[: self.limit]
        return data.images[held], data.labels[held]

    @torch.no_grad()
    def evaluate(self, model, data_root: str | None = None) -> list[Metric]:
        x, y = self.heldout(model)
        correct: list[float] = []
        for s in range(0, x.shape[0], self.batch_size):
            logits = model.module(x[s:s + self.batch_size]).float()
            correct += (logits.argmax(1) == y[s:s + self.batch_size]).float().tolist()
        notes = {"images": len(correct), "split": f"20% held out, randperm seed {self.split_seed}",
                 "dataset": "scikit-learn load_digits", "input_range": "[-1, 1]"}
        metrics = [Metric(f"digits8x8.top1.heldout{self.limit_tag()}", sum(correct) / len(correct), "higher",
                          per_sample=correct, per_sample_name="image_top1_correct", notes=notes)]
        params = sum(p.numel() for p in model.module.parameters())
        if params:  # a deployed model (e.g. a C simulation) has no torch layers to count
            metrics.append(Metric("cost.macs.i8", float(image.count_macs(model.module, x[:1])), "lower", "MAC",
                                  notes={"counted": "forward hooks on Conv2d/Linear"}))
            metrics.append(Metric("cost.params", float(params), "lower"))
        return metrics

    def workload(self, model, data_root: str | None = None) -> Workload:
        return Workload(kind="image", inputs=self.heldout(model)[0][:1], label="digit8x8")
