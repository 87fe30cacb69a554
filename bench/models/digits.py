"""`suite_classifier`: a small image classifier the suite trains itself, kind `image_classifier`, so that every
vision method (`rtn`, `static_ptq`, `minifloat`, ...) and backend applies to a model whose accuracy can be
measured offline.

The only one so far is the LeNet-5 (`LeNet`, `ClassifierRecipe` below) that is also the feature extractor of the
diffusion track's `fd_lenet`: trained on scikit-learn's `load_digits` (1797 real 8x8 digits, scaled to [-1, 1]),
80/20 split by a seeded permutation (`bench.image_sets.heldout_split`), Adam on the cross-entropy, cached under
`<results>/trained/` by recipe + data + training code (bench/models/suite_training.py). The same recipe gives the
same checkpoint as `fd_lenet` (one training for both). The held-out split is recomputed and checked at load: the
uncompressed model's top-1 on it must equal the training record's `heldout_top1`, so the task never evaluates on
training images.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import ConfigError, DataCorrupt
from bench.image_sets import ImageSet, heldout_split, load_images
from bench.models.suite_training import cached_train
from bench.training import Trainer


class LeNet(nn.Module):
    """LeNet-5 layout (conv 5x5 -> pool -> conv 5x5 -> pool -> 120 -> 84 -> classes), padded so that 8x8
    inputs keep two poolings; `features` returns the 84-d penultimate activations."""

    def __init__(self, in_ch: int = 1, n_classes: int = 10, image_size: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=2)
        side = image_size // 4
        self.fc1, self.fc2 = nn.Linear(16 * side * side, 120), nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc2(F.relu(self.fc1(h.flatten(1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.features(x))


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
        return LeNet(1, 10, side)


def train_classifier(recipe: ClassifierRecipe, data: ImageSet) -> tuple[nn.Module, dict]:
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    tr, te = heldout_split(data.images.shape[0], g)  # g goes on to draw the epoch orders
    n_train = len(tr)
    model = recipe.build(data.side)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    per_epoch = math.ceil(n_train / recipe.batch_size)
    order = [tr]

    def step_fn(step):  # epochs of shuffled batches, the last one short
        if step % per_epoch == 0:
            order[0] = tr[torch.randperm(n_train, generator=g)]
        s = (step % per_epoch) * recipe.batch_size
        idx = order[0][s:s + recipe.batch_size]
        return F.cross_entropy(model(data.images[idx]), data.labels[idx]), {}

    t0 = time.perf_counter()
    Trainer("lenet training", opt, recipe.epochs * per_epoch, samples_per_step=recipe.batch_size,
            train_samples=n_train, progress=False).run(step_fn)
    model.eval()
    with torch.no_grad():
        acc = float((model(data.images[te]).argmax(1) == data.labels[te]).float().mean())
    return model, {"train_seconds": time.perf_counter() - t0, "heldout_top1": acc, "n_heldout": len(te)}


def load_classifier(recipe: ClassifierRecipe, cache_dir: str | None) -> tuple[nn.Module, dict, ImageSet]:
    data = load_images(recipe.dataset)
    code = (load_images, heldout_split, train_classifier, Trainer, LeNet)  # the source that training runs
    model, record = cached_train("lenet", recipe, data, cache_dir, train_classifier, lambda: recipe.build(data.side),
                                 code)
    return model, record, data


def load_suite_classifier(spec) -> tuple[nn.Module, dict]:
    """The trained classifier of `spec.recipe` (the caller rounds it to storage and wraps it) and its facts."""
    try:
        recipe = ClassifierRecipe(**(spec.recipe or {}))
    except TypeError as e:
        raise ConfigError(f"model '{spec.name}' has an invalid classifier recipe ({e})",
                          "fields: dataset, epochs, batch_size, lr, seed") from None
    module, record, data = load_classifier(recipe, spec.results)
    module.eval()
    _, held = heldout_split(data.images.shape[0], torch.Generator().manual_seed(recipe.seed))
    with torch.no_grad():
        top1 = float((module(data.images[held]).argmax(1) == data.labels[held]).float().mean())
    if abs(top1 - float(record.get("heldout_top1", -1))) > 1e-6:
        raise DataCorrupt(f"model '{spec.name}': top-1 {top1:.4f} on the recomputed held-out split differs from the "
                          f"training record's {record.get('heldout_top1')}",
                          "delete the cached classifier under <results>/trained/ to retrain it")
    module.bench_kind = "image_classifier"
    module.bench_input_shape = tuple(data.images.shape[1:])  # (C, H, W): what a converter needs to know
    info = {"architecture": type(module).__name__, "dataset": data.name, "dataset_source": data.source,
            "data_sha256": data.sha256, "image_side": data.side, "channels": int(data.images.shape[1]),
            "input_range": "[-1, 1] (raw / 8 - 1)", "split_seed": recipe.seed, "n_heldout": int(held.numel()),
            "train_heldout_top1": record.get("heldout_top1"), "train_seconds": record.get("train_seconds"),
            "train_cache": record.get("cache"), "recipe": asdict(recipe)}
    return module, info
