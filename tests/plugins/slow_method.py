"""A test-only plug-in: compress marks that it has started (the file named by BENCH_TEST_STARTED) and then
waits, so that a test can interrupt a run in the middle of compression."""

import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench.plugins import Method


@dataclass
class SlowMethod(Method):
    name: str = "slow"

    def compress(self, model, calib, budget):
        Path(os.environ["BENCH_TEST_STARTED"]).touch()
        time.sleep(600)
        raise RuntimeError("slow: was not interrupted")
