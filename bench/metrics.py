"""`Metric`: a protocol-qualified number with its direction, unit, stderr, interval and the per-sample values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Metric:
    name: str  # protocol in the name, e.g. "wikitext2.ppl_token.gptq_s2048"
    value: float
    direction: str  # "lower" | "higher" is better
    unit: str = ""
    stderr: float | None = None
    ci: tuple[float, float] | None = None  # 95% bootstrap interval over the per-sample values, where computed
    per_sample: list[float] | None = None  # the values it was aggregated from (stored as an artifact)
    per_sample_name: str = ""  # what one per-sample value is, e.g. "window_nll_mean"
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.direction not in ("lower", "higher"):
            raise ValueError(f"direction must be 'lower' or 'higher', not {self.direction!r}")

    @property
    def finite(self) -> bool:
        return self.value is not None and math.isfinite(self.value)
