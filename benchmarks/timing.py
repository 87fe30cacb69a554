"""Side-by-side timing shared by the benchmark scripts: every variant runs once per round, rounds
interleaved, so drift in machine load hits all variants alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(runs: dict[str, Callable[[], object]], rounds: int, warmup: bool = True) -> dict[str, float]:
    """Median seconds of each callable over `rounds` interleaved rounds (after one untimed warm-up call)."""
    if warmup:
        for f in runs.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
