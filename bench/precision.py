"""Compute precision: how a run's forwards are computed, never how weights are stored.

Two keys, because the two halves of a run differ in what bf16 does to them (measured, docs/running.md):
`precision` computes evaluation, deployment and timing (the metric's protocol; bf16 moved no full-WikiText-2
perplexity by more than 0.1%), `compress_precision` the method's calibration and training forwards (bf16 moved
gptq W3's stored result, and so its perplexity, by 6.8%). Both take `bf16 | fp32`.

`fp32` is the reference protocol: every op in float32, as the suite computed before this axis existed.
`bf16` is mixed precision in the manner of `torch.autocast` on the CPU: matmuls, linears, convolutions and
attention take bfloat16 inputs and accumulate in fp32 inside oneDNN's kernels; parameters, optimizer master
weights, norms' and losses' reductions that autocast keeps in fp32 (cross_entropy, kl_div, mse_loss) stay fp32.
Stored weights (fake-quant grids included) are unchanged: only the forward's arithmetic differs.

Numerics that must stay fp32 under either precision run inside `fp32()`: Hessians and their Cholesky factors
(GPTQ, SparseGPT, BiLLM, ...), the error feedback of their column sweeps, Gram matrices and accumulated errors
of scale searches. Hooks that collect activations upcast what they receive, since under bf16 a linear's input
may already be bfloat16 (e.g. attention output feeding o_proj).

The autocast weight cache is off (`cache_enabled=False`): methods rewrite weights in place between forwards
(GPTQ's block-by-block quantization) and training updates them every step, and a cached bf16 copy would then
silently run the old weights.

A machine without bf16 matrix units still runs bf16 correctly, through slower kernels; `kernels()` records
which ones: torch's CPU capability, the CPU's bf16/AMX flags and the ISA oneDNN reports for a bf16 matmul.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path

import torch

from bench.errors import ConfigError

PRECISIONS = ("bf16", "fp32")  # the names scripts use; fp32 is the reference protocol
REFERENCE = "fp32"
_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}


def check(precision: str, key: str = "precision") -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision} is unknown",
                          f"use {key}=bf16 (mixed precision, bf16 matmuls) or {key}=fp32 (the reference)")
    return precision


def compute(precision: str):
    """The context every forward of a run executes in (compression, training, evaluation, timing); on a machine
    with CUDA, the GPU's forwards too (hardware=cuda)."""
    check(precision)
    return _autocast(precision == "bf16")


@contextlib.contextmanager
def _autocast(bf16: bool):
    # fp32 is explicit: an fp32 cell is fp32 even if a caller left an autocast region open
    kw = {"dtype": torch.bfloat16, "cache_enabled": False} if bf16 else {"enabled": False}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", **kw))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", **kw))
        yield


def fp32(fn=None):
    """An fp32 island inside a bf16 run: `with fp32(): ...` or `@fp32` on a function. Its tensors should be
    upcast by the caller (`x.float()`): disabling autocast does not convert tensors that are already bf16."""
    if fn is None:
        return _autocast(False)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _autocast(False):
            return fn(*args, **kwargs)

    return wrapper


def active() -> str:
    """The precision forwards run in right now (what a helper that must know it, e.g. a timer, records)."""
    return "bf16" if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16 \
        else "fp32"


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def onednn_isa(dtype: torch.dtype = torch.bfloat16) -> str:
    """The implementation oneDNN picks for a small matmul in `dtype` (e.g. 'brg_matmul:avx512_core_amx' where
    AMX runs it, 'brg_matmul:avx512_core_bf16' on AVX512-BF16 without AMX), read from its verbose log."""
    x = torch.randn(64, 64, dtype=dtype)
    return onednn_matmul_impl(lambda: torch.nn.functional.linear(x, x))


def onednn_matmul_impl(run) -> str:
    """The implementation of the last matmul (or gemm API call) oneDNN executes while `run()` runs, read from its
    verbose log."""
    if not torch.backends.mkldnn.is_available():
        return "onednn unavailable"
    out = b""
    with tempfile.TemporaryFile() as f:
        import sys

        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                run()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        out = f.read()
    impl = "not oneDNN (torch's own kernel)"
    for line in out.decode(errors="replace").splitlines():
        parts = line.split(",")
        if len(parts) > 6 and parts[2] == "primitive" and parts[3] == "exec" and parts[5] in ("matmul", "gemm_api"):
            impl = parts[6] or parts[5]  # oneDNN's gemm API (torch._int_mm) names no implementation
    return impl


def kernels(precision: str) -> dict[str, str]:
    """What really computes this precision's matmuls on this machine (stored with every record)."""
    flags = cpu_flags()
    units = [f for f in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512_fp16") if f in flags]
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_matrix_flags": " ".join(units) or "none"}
    if precision == "bf16":
        out["bf16_matmul"] = onednn_isa(torch.bfloat16)
        out["bf16_matrix_units"] = "amx" if "amx_bf16" in flags else ("avx512_bf16 (no AMX)" if "avx512_bf16" in flags
                                                                      else "none: emulated, slower than fp32")
    return out
