"""The timing protocol's settings live once: `bench.timing.TimedBackend` validates them, and every timed backend's
YAML takes them from configs/hardware/timing/default.yaml through its Hydra defaults list."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from bench.errors import ConfigError
from bench.hardware.cpu import CpuBackend
from bench.timing import TimedBackend
from conftest import ROOT, compose

TIMED = ("cpu", "cpu_kernels", "cuda", "tflite")


@pytest.mark.parametrize("hardware", TIMED)
def test_every_timed_backend_takes_the_shared_protocol(hardware):
    shared = OmegaConf.load(ROOT / "configs" / "hardware" / "timing" / "default.yaml")
    cfg = compose(f"hardware={hardware}", "threads=3", "hardware.min_reps=7")
    node = OmegaConf.to_container(cfg.hardware, resolve=True)
    assert node["threads"] == 3 and node["min_reps"] == 7  # the run's threads, an override on top
    assert (node["warmup"], node["min_seconds"]) == (shared.warmup, shared.min_seconds)
    assert "\nthreads:" not in (ROOT / "configs" / "hardware" / f"{hardware}.yaml").read_text()  # not copied


def test_bad_timing_settings_are_one_line():
    with pytest.raises(ConfigError, match=r"hardware timing needs threads >= 1, warmup >= 0, min_reps >= 1"):
        CpuBackend(min_reps=0)
    assert issubclass(CpuBackend, TimedBackend)
    timer = CpuBackend(warmup=0, min_reps=2, min_seconds=0.0).timer()
    calls = []
    assert len(timer.times(lambda: calls.append(1))) == 2 and len(calls) == 2  # no warm-up, two timed calls
