"""Latency protocol shared by the backends: `warmup` untimed runs, then repetitions until both `min_reps` and
`min_seconds` are reached; p50/p90 and the coefficient of variation. Language models are timed as a prefill
of the workload's prompt and as greedy decoding of `decode_tokens` tokens after it (per token = run minus
the prefill's median, over the tokens). A backend passes its own clock (`one`, seconds for one call of fn),
e.g. CUDA events; the default is the wall clock. `TimedBackend` holds the protocol's settings for every backend that
times a model (their YAMLs take them from configs/hardware/timing/default.yaml)."""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from torch import nn

from bench.errors import ConfigError
from bench.plugins import HardwareBackend


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def wall_clock(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class Timer:
    warmup: int = 1
    min_reps: int = 3
    min_seconds: float = 2.0
    one: Callable[[Callable[[], object]], float] = wall_clock

    def times(self, fn: Callable[[], object]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        times, start = [], time.perf_counter()
        while len(times) < self.min_reps or time.perf_counter() - start < self.min_seconds:
            times.append(self.one(fn))
        return times


@dataclass
class TimedBackend(HardwareBackend):
    """A backend that times the model on this machine with the protocol above."""

    threads: int = 2  # torch (and runtime) intra-op threads, recorded
    warmup: int = 1
    min_reps: int = 3
    min_seconds: float = 2.0

    def __post_init__(self):
        if self.threads < 1 or self.warmup < 0 or self.min_reps < 1 or self.min_seconds < 0:
            raise ConfigError(f"hardware timing needs threads >= 1, warmup >= 0, min_reps >= 1 and min_seconds >= 0 "
                              f"(got {self.threads}, {self.warmup}, {self.min_reps}, {self.min_seconds})",
                              "e.g. hardware.threads=2 hardware.warmup=1 hardware.min_reps=3 hardware.min_seconds=2")

    def timer(self, one: Callable[[Callable[[], object]], float] = wall_clock) -> Timer:
        return Timer(self.warmup, self.min_reps, self.min_seconds, one)


def stats(prefix: str, xs: list[float]) -> dict[str, float]:
    mean = statistics.fmean(xs)
    cv = statistics.pstdev(xs) / mean if mean > 0 else 0.0
    return {f"{prefix}.p50_s": percentile(xs, 0.5), f"{prefix}.p90_s": percentile(xs, 0.9),
            f"{prefix}.cv": cv, f"{prefix}.reps": float(len(xs))}


@dataclass
class LmLatency:
    metrics: dict[str, float]  # latency.prefill_<n>.*, latency.decode_per_token.*, throughput.*
    prefill_p50_s: float
    n_prompt: int
    timed_s: float  # total time of the timed runs (to turn a measured energy into power)


def causal_lm(model: nn.Module, prompt_ids, decode_tokens: int, timer: Timer) -> LmLatency:
    """Prefill and greedy decode of a Hugging Face causal LM (called under inference mode)."""
    n_prompt = prompt_ids.shape[1]

    def prefill():
        return model(prompt_ids, use_cache=False).logits

    def decode():
        out = model(prompt_ids, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_tokens):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)

    t_pre = timer.times(prefill)
    m = stats(f"latency.prefill_{n_prompt}", t_pre)
    pre_p50 = m[f"latency.prefill_{n_prompt}.p50_s"]
    t_dec = timer.times(decode)
    # decode time per token = (prefill + decode run) minus the prefill, over the decoded tokens
    m.update(stats("latency.decode_per_token", [max(t - pre_p50, 0.0) / decode_tokens for t in t_dec]))
    m["throughput.prefill_tokens_per_s"] = n_prompt / pre_p50
    m["throughput.decode_tokens_per_s"] = 1.0 / max(m["latency.decode_per_token.p50_s"], 1e-12)
    return LmLatency(m, pre_p50, n_prompt, sum(t_pre) + sum(t_dec))


def host_memory(model: nn.Module) -> tuple[dict[str, float], int]:
    """The torch module's resident parameter + buffer bytes and the process's peak RSS; also the number of
    parameters (tied weights once)."""
    params = {id(p): p for p in model.parameters()}.values()
    tensors = list(params) + list(model.buffers())
    return ({"memory.model_resident_bytes": float(sum(t.numel() * t.element_size() for t in tensors)),
             "memory.peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)},
            sum(p.numel() for p in params))
