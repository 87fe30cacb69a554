"""Side-by-side timing shared by the benchmark scripts: every variant runs once per round, rounds
interleaved, so drift in machine load hits all variants alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(runs: dict[str, Callable[[], object]], rounds: int, warmup: bool = True,
                        statistic: Callable[[list[float]], float] = statistics.median,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of each callable over `rounds` interleaved rounds (after one untimed warm-up call).
    On a core shared with other processes, `statistic=min` (the best round) and `clock=time.process_time` (this
    process's CPU seconds, blind to time spent preempted; one thread only) are the robust choices."""
    if warmup:
        for f in runs.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, f in runs.items():
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    return {k: statistic(v) for k, v in times.items()}
