"""Calibration data: a named, seeded component shared by every method of a comparison.

`calib=wikitext2_valid` (default offline): random windows of the WikiText-2 *validation* text (the train
split is not available offline; the test split is never used for calibration). Online users can pick the
hub's WikiText-2 train split or C4. Sampling follows GPTQ: `n_samples` windows of `seqlen` tokens at
uniformly random offsets from a seeded RNG. The set's identity (name, split, n, seqlen, seed, token hash)
goes into every record and into the compressed-model cache key.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from bench import data
from bench.errors import BenchError, ConfigError


@dataclass
class CalibSpec:
    name: str
    source: str = "wikitext2"  # "wikitext2" (local file or hub) | "hub" (any datasets id)
    split: str = "validation"
    hub_path: str | None = None
    hub_name: str | None = None
    text_field: str = "text"
    seed: int = 0
    description: str = ""

    def __post_init__(self):
        if self.source not in ("wikitext2", "hub"):
            raise ConfigError(f"calib.source='{self.source}' is unknown", "use 'wikitext2' or 'hub'")
        if self.source == "wikitext2" and self.split == "test":
            raise ConfigError("calib.split=test would calibrate on the evaluation text",
                              "use split=validation (offline) or split=train (online)")
        if self.source == "hub" and not self.hub_path:
            raise ConfigError(f"calib '{self.name}' has source=hub but no hub_path", "set calib.hub_path")


@dataclass
class CalibSet:
    spec: CalibSpec
    windows: torch.Tensor  # (n_samples, seqlen) token ids
    sha256: str

    @property
    def describe(self) -> str:
        n, s = self.windows.shape
        return f"{self.spec.name}[{self.spec.split}] {n}x{s} seed={self.spec.seed}"


def load(spec: CalibSpec, tokenizer, n_samples: int, seqlen: int, data_root: str | None = None) -> CalibSet:
    if n_samples <= 0 or seqlen <= 0:
        raise ConfigError(f"calibration needs n_samples>0 and seqlen>0 (got {n_samples}, {seqlen})",
                          "set budget.calib_samples and budget.calib_seqlen to positive values")
    if spec.source == "wikitext2":
        rows = data.wikitext2_rows(spec.split, data_root)
        text = "\n\n".join(rows)
    else:
        rows = data.hub_rows(spec.hub_path, spec.hub_name, spec.split, spec.text_field)
        text = "\n\n".join(rows)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise BenchError(f"calibration set '{spec.name}' has {ids.numel()} tokens, fewer than seqlen={seqlen}",
                         "use a larger split or a smaller budget.calib_seqlen")
    rng = random.Random(spec.seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(n_samples)]
    windows = torch.stack([ids[s:s + seqlen] for s in starts])
    sha = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    return CalibSet(spec, windows, sha)
