"""`budget=`: how much calibration data and training compute a method may use.

The same budget is applied to every method of a comparison. `val_samples` held-out calibration samples (drawn after
the training ones, disjoint from them: bench.calib) give every training loop its validation loss; they do not
change what is trained on, so they are not part of the artifact key (the shipped YAMLs other than `cpu` leave it
at its default, 8: `+budget.val_samples=N` sets it). `budget=default` finishes on a 2-core CPU;
`budget=paper` is the papers' recipe for a GPU: BinaryMoS's reference recipe, replaced field by field by
a method's own where `configs/budget_recipe/paper_<method>.yaml` records it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.errors import ConfigError


@dataclass
class Budget:
    name: str
    calib_samples: int = 128
    calib_seqlen: int = 512
    train_steps: int = 0  # optimizer steps for training-based methods (0 = derive from epochs)
    epochs: float = 0.0
    batch_size: int = 1
    lr: float = 1e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0  # AdamW's, for training-based methods
    val_samples: int = 8  # held-out calibration samples (disjoint from the training ones) for the validation loss
    description: str = ""

    def __post_init__(self):
        for key in ("calib_samples", "calib_seqlen", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"budget.{key}={getattr(self, key)} must be positive", f"set budget.{key}>0")
        for key in ("train_steps", "epochs", "weight_decay", "val_samples"):
            if getattr(self, key) < 0:
                raise ConfigError(f"budget.{key}={getattr(self, key)} is negative", f"set budget.{key}>=0")
        if self.lr <= 0:
            raise ConfigError(f"budget.lr={self.lr} must be positive", "e.g. budget.lr=2e-4")

    def steps(self) -> int:
        if self.train_steps:
            return self.train_steps
        per_epoch = max(1, self.calib_samples // self.batch_size)
        return max(1, round(self.epochs * per_epoch))
