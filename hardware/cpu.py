"""`cpu`: wall-clock latency of prefill and decode (language models) or of one forward pass (image models)
on this machine's CPU with torch.

Protocol: `warmup` untimed runs, then repetitions until both `min_reps` and `min_seconds` are reached;
p50/p90 and the coefficient of variation are reported. Threads are set explicitly (torch intra-op) and
recorded. Peak memory is the process's peak RSS (resource.getrusage) and the model's resident parameter
bytes. Energy comes from RAPL when readable, else an op-count estimate labelled `model:<table>`.

Capabilities: this backend runs every packed model in fp32 through torch. It executes no low-bit kernel:
a quantized or binarized model runs as fake-quant, and the record says `execution=fake-quant`.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from bench import energy
from bench.errors import ConfigError
from bench.packed import Packed
from bench.plugins import Backend, Measurement, Workload


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class CpuBackend(Backend):
    name: str = "cpu"
    threads: int = 2
    warmup: int = 1
    min_reps: int = 3
    min_seconds: float = 2.0
    capabilities: ClassVar[dict] = {
        "weight_formats": ["fp32", "fp16-storage"], "activation_formats": ["fp32"],
        "low_bit_kernels": [], "binary_ops": False, "sparsity": [],
        "executes_compressed_as": "fake-quant (fp32 matmul on dequantized weights)",
    }

    def __post_init__(self):
        if self.threads <= 0 or self.min_reps <= 0 or self.min_seconds < 0:
            raise ConfigError("hardware threads/min_reps must be positive", "e.g. hardware.threads=2")

    def _timed(self, fn) -> list[float]:
        for _ in range(self.warmup):
            fn()
        times, start = [], time.perf_counter()
        while len(times) < self.min_reps or time.perf_counter() - start < self.min_seconds:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return times

    @staticmethod
    def _stats(prefix: str, xs: list[float]) -> dict[str, float]:
        mean = statistics.fmean(xs)
        cv = statistics.pstdev(xs) / mean if mean > 0 else 0.0
        return {f"{prefix}.p50_s": _percentile(xs, 0.5), f"{prefix}.p90_s": _percentile(xs, 0.9),
                f"{prefix}.cv": cv, f"{prefix}.reps": float(len(xs))}

    @staticmethod
    def _memory(model) -> tuple[dict[str, float], int]:
        params = {id(p): p for p in model.parameters()}.values()
        tensors = list(params) + list(model.buffers())
        return ({"memory.model_resident_bytes": float(sum(t.numel() * t.element_size() for t in tensors)),
                 "memory.peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)},
                sum(p.numel() for p in params))

    def _tags(self, packed: Packed) -> dict[str, str]:
        return {"execution": packed.execution, "threads": str(self.threads),
                "low_bit_kernel": "none (fake-quant)" if packed.execution != "dense" else "none (dense fp32)"}

    @torch.inference_mode()
    def measure(self, packed: Packed, workload: Workload) -> Measurement:
        torch.set_num_threads(self.threads)
        if workload.kind == "image":
            return self._measure_image(packed, workload)
        model = packed.model
        ids = workload.prompt_ids
        n_prompt = ids.shape[1]
        rapl = energy.RaplMeter()

        def prefill():
            return model(ids, use_cache=False).logits

        def decode():
            out = model(ids, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            for _ in range(workload.decode_tokens):
                out = model(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)

        if rapl.readable:
            rapl.start()
        t_pre = self._timed(prefill)
        m = self._stats(f"latency.prefill_{n_prompt}", t_pre)
        pre_p50 = m[f"latency.prefill_{n_prompt}.p50_s"]
        t_dec = self._timed(decode)
        # decode time per token = (prefill + decode run) minus the prefill, over the decoded tokens
        per_tok = [max(t - pre_p50, 0.0) / workload.decode_tokens for t in t_dec]
        m.update(self._stats("latency.decode_per_token", per_tok))
        m["throughput.prefill_tokens_per_s"] = n_prompt / pre_p50
        m["throughput.decode_tokens_per_s"] = 1.0 / max(m["latency.decode_per_token.p50_s"], 1e-12)
        memory, n_weights = self._memory(model)
        m.update(memory)
        tags = self._tags(packed)
        if rapl.readable:
            joules = rapl.stop_joules()
            total_time = sum(t_pre) + sum(t_dec)
            tags["energy_source"] = "rapl"
            value = joules / max(total_time, 1e-9) * pre_p50 / n_prompt
        else:
            # Estimate for one prefill token: ~1 MAC per weight; weights streamed from DRAM once per prefill.
            value = energy.estimate_dense_joules(n_weights, 4 * n_weights / n_prompt)
            tags["energy_source"] = f"model:{energy.HOROWITZ_TABLE}"
        m[energy.metric_name("prefill_j_per_token", tags["energy_source"])] = value
        return Measurement(m, tags)

    def _measure_image(self, packed: Packed, workload: Workload) -> Measurement:
        """One forward pass of the workload's image batch, timed; energy per image."""
        from bench.image import count_macs

        model, x = packed.model, workload.inputs
        rapl = energy.RaplMeter()
        if rapl.readable:
            rapl.start()
        times = self._timed(lambda: model(x))
        prefix = f"latency.{workload.label or 'forward'}"
        m = self._stats(prefix, times)
        memory, n_weights = self._memory(model)
        m.update(memory)
        tags = self._tags(packed)
        if rapl.readable:
            tags["energy_source"] = "rapl"
            # average power over the timed runs (warm-up included, as for the LM workload) x median time
            value = rapl.stop_joules() / max(sum(times), 1e-9) * m[f"{prefix}.p50_s"] / x.shape[0]
        else:
            value = energy.estimate_dense_joules(count_macs(model, x[:1]), 4 * n_weights)
            tags["energy_source"] = f"model:{energy.HOROWITZ_TABLE}"
        m[energy.metric_name("j_per_image", tags["energy_source"])] = value
        return Measurement(m, tags)
