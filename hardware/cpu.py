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

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from bench import energy, timing
from bench.packed import Packed
from bench.plugins import Measurement, Workload
from bench.timing import TimedBackend


@dataclass
class CpuBackend(TimedBackend):
    name: str = "cpu"
    capabilities: ClassVar[dict] = {
        "weight_formats": ["fp32", "fp16-storage"], "activation_formats": ["fp32"],
        "low_bit_kernels": [], "binary_ops": False, "sparsity": [],
        "executes_compressed_as": "fake-quant (fp32 matmul on dequantized weights)",
    }

    def _tags(self, packed: Packed) -> dict[str, str]:
        return {"execution": packed.execution, "threads": str(self.threads),
                "low_bit_kernel": "none (fake-quant)" if packed.execution != "dense" else "none (dense fp32)"}

    @torch.inference_mode()
    def measure(self, packed: Packed, workload: Workload) -> Measurement:
        torch.set_num_threads(self.threads)
        if workload.kind == "image":
            return self._measure_image(packed, workload)
        if workload.kind == "diffusion":
            return self._measure_diffusion(packed, workload)
        model = packed.model
        rapl = energy.RaplMeter().start()
        lat = timing.causal_lm(model, workload.prompt_ids, workload.decode_tokens, self.timer())
        m, pre_p50, n_prompt = lat.metrics, lat.prefill_p50_s, lat.n_prompt
        memory, n_weights = timing.host_memory(model)
        m.update(memory)
        tags = self._tags(packed)
        # the estimate for one prefill token: ~1 MAC per weight; weights streamed from DRAM once per prefill
        energy.record(m, tags, "prefill_j_per_token", rapl,
                      measured=lambda joules: joules / max(lat.timed_s, 1e-9) * pre_p50 / n_prompt,
                      estimate=lambda: energy.estimate_dense_joules(n_weights, 4 * n_weights / n_prompt))
        return Measurement(m, tags)

    def _measure_diffusion(self, packed: Packed, workload: Workload) -> Measurement:
        """A whole sampling run from `inputs` timed as one image workload (energy per image from its MACs over
        every step), plus the per-step latency = per image / steps."""
        sampling = dataclasses.replace(packed, model=workload.sampler(packed.model))
        out = self._measure_image(sampling, workload)
        prefix = f"latency.{workload.label or 'forward'}"
        n = workload.inputs.shape[0]
        for q in ("p50", "p90"):
            out.metrics[f"{prefix}.per_image.{q}_s"] = out.metrics[f"{prefix}.{q}_s"] / n
            out.metrics[f"{prefix}.per_step.{q}_s"] = out.metrics[f"{prefix}.{q}_s"] / n / workload.steps
        return out

    def _measure_image(self, packed: Packed, workload: Workload) -> Measurement:
        """One forward pass of the workload's image batch, timed; energy per image."""
        from bench.image import count_macs

        model, x = packed.model, workload.inputs
        rapl = energy.RaplMeter().start()
        times = self.timer().times(lambda: model(x))
        prefix = f"latency.{workload.label or 'forward'}"
        m = timing.stats(prefix, times)
        memory, n_weights = timing.host_memory(model)
        m.update(memory)
        tags = self._tags(packed)
        # measured: average power over the timed runs (warm-up included, as for the LM workload) x median time
        energy.record(m, tags, "j_per_image", rapl,
                      measured=lambda joules: joules / max(sum(times), 1e-9) * m[f"{prefix}.p50_s"] / x.shape[0],
                      estimate=lambda: energy.estimate_dense_joules(count_macs(model, x[:1]), 4 * n_weights))
        return Measurement(m, tags)
