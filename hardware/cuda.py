"""`cuda`: latency, peak memory and energy of the packed model on one NVIDIA GPU with torch.

Protocol: the packed model is copied to the GPU (the evaluated CPU model is untouched) and timed as on `cpu`
(bench/timing.py: warm-up, repetitions until min_reps and min_seconds, p50/p90/CV of prefill and of decode
per token), each call timed by a pair of CUDA events around it (GPU time, synchronized on the end event).
Peak memory is `torch.cuda.max_memory_allocated` over the timed runs (the caching allocator's peak, not
the driver's), beside the model's parameter bytes. Energy is NVML's total-energy counter
(`nvmlDeviceGetTotalEnergyConsumption`, Volta and newer) read before and after the timed runs, labelled
`nvml`; without nvidia-ml-py or a GPU that reports it, no energy is recorded and the reason is a tag.

Capabilities: every packed model runs in fp32 through torch/cuBLAS. No low-bit kernel runs: a quantized or
binarized model executes as fake-quant and the record says so. Needs a CUDA build of torch and a visible GPU:
otherwise `hardware=cuda` fails when the config is built, before anything runs or is recorded.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from bench import energy, timing
from bench.errors import ConfigError, ResourceError
from bench.packed import Packed
from bench.plugins import Measurement, Workload
from bench.timing import TimedBackend


def cuda_problem(device: int) -> str | None:
    """Why torch cannot run on GPU `device` here, or None."""
    if torch.version.cuda is None:
        return f"hardware 'cuda' needs an NVIDIA GPU, but torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "hardware 'cuda' needs an NVIDIA GPU, but torch sees none (no device visible to the CUDA driver)"
    if device >= torch.cuda.device_count():
        return f"hardware.device={device} but torch sees {torch.cuda.device_count()} GPU(s)"
    return None


def event_clock(fn) -> float:
    """Seconds of GPU time for one call of fn, from CUDA events recorded around it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


class NvmlMeter:
    """NVML's total energy counter (mJ since driver load) of the GPU torch calls `device`. `reason` says why
    there is none: nvidia-ml-py not installed (it is optional), no NVML, or a GPU that does not report it."""

    def __init__(self, device: int):
        self.handle, self.reason = None, None
        try:
            import pynvml  # nvidia-ml-py: optional, imported only here
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            p = torch.cuda.get_device_properties(device)
            # torch's index follows CUDA_VISIBLE_DEVICES, NVML's does not: find the GPU by its PCI address
            bus = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
            self.handle = pynvml.nvmlDeviceGetHandleByPciBusId_v2(bus)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except (pynvml.NVMLError, AttributeError) as e:
            self.handle, self.reason = None, f"NVML gives no energy counter for this GPU ({e})"

    def start(self):
        self._mj0 = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def stop_joules(self) -> float:
        return (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self._mj0) / 1e3


@dataclass
class CudaBackend(TimedBackend):
    name: str = "cuda"
    device: int = 0  # threads: the host's torch intra-op threads
    capabilities: ClassVar[dict] = {
        "weight_formats": ["fp32", "fp16-storage"], "activation_formats": ["fp32"],
        "low_bit_kernels": [], "binary_ops": False, "sparsity": [],
        "executes_compressed_as": "fake-quant (fp32 cuBLAS matmuls on dequantized weights)",
    }

    def __post_init__(self):
        super().__post_init__()
        if self.device < 0:
            raise ConfigError(f"hardware.device={self.device} is negative", "e.g. hardware.device=0")
        problem = cuda_problem(self.device)
        if problem:
            raise ResourceError(problem, "run on a machine with a GPU and a CUDA build of torch, or choose "
                                         "hardware=cpu or hardware=cpu_kernels")

    @torch.inference_mode()
    def measure(self, packed: Packed, workload: Workload) -> Measurement:
        torch.set_num_threads(self.threads)
        dev = torch.device("cuda", self.device)
        model = copy.deepcopy(packed.model).to(dev)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        timer = self.timer(one=event_clock)
        meter = NvmlMeter(self.device)
        if meter.handle is not None:
            meter.start()
        t0 = time.perf_counter()
        if workload.kind == "image":
            x = workload.inputs.to(dev)
            times = timer.times(lambda: model(x))
            prefix = f"latency.{workload.label or 'forward'}"
            m, quantity = timing.stats(prefix, times), "j_per_image"
            per_unit = m[f"{prefix}.p50_s"] / x.shape[0]
        else:
            lat = timing.causal_lm(model, workload.prompt_ids.to(dev), workload.decode_tokens, timer)
            m, quantity = lat.metrics, "prefill_j_per_token"
            per_unit = lat.prefill_p50_s / lat.n_prompt
        wall = time.perf_counter() - t0
        joules = meter.stop_joules() if meter.handle is not None else None
        memory, _ = timing.host_memory(model)
        m["memory.model_resident_bytes"] = memory["memory.model_resident_bytes"]
        m["memory.gpu_peak_allocated_bytes"] = float(torch.cuda.max_memory_allocated(dev))
        tags = {"execution": packed.execution, "threads": str(self.threads), "gpu": torch.cuda.get_device_name(dev),
                "cuda_version": str(torch.version.cuda),
                "low_bit_kernel": "none (fake-quant)" if packed.execution != "dense" else "none (dense fp32)"}
        if joules is not None:
            tags["energy_source"] = "nvml"
            # average power over the whole timed span (warm-up included) x the median time of one unit
            m[energy.metric_name(quantity, "nvml")] = joules / max(wall, 1e-9) * per_unit
        else:
            tags["energy_unavailable"] = meter.reason
        return Measurement(m, tags)
