"""What the machine must provide, checked before the work starts: a writable results directory, and enough
memory for the model.

Memory is estimated before anything is loaded.

Parameters are counted from the safetensors headers of a local model directory (a few kilobytes read, no
tensor loaded), times the bytes of the compute dtype, times two: the runner keeps the base model and a copy
for the method to compress. That is a lower bound (training methods also hold gradients and optimizer
state). It is compared with what this process may still use: the kernel's MemAvailable, the cgroup's
memory.max minus its usage, and the address-space rlimit (`cell_memory_gb` in sweeps) minus what the process
has mapped already. Models that are not a local safetensors directory (hub ids, GGUF packages) are not
estimated.
"""

from __future__ import annotations

import json
import math
import os
import resource
import struct
import tempfile
from pathlib import Path

from bench.errors import ResourceError

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
COPIES = 2  # base model + the copy a method compresses


def results_dir_from(argv: list[str]) -> str:
    """The results directory a command line will use (`paths.results=`, else BENCH_RESULTS, else results)."""
    for a in argv:
        if a.startswith("paths.results="):
            return a.split("=", 1)[1]
    return os.environ.get("BENCH_RESULTS", "results")


def writable_dir(results_dir: str | Path) -> Path:
    """The results directory, created if needed, or a one-line error if files cannot be created in it."""
    path = Path(results_dir).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ResourceError(f"results directory '{results_dir}' is not writable ({e.strerror or e})",
                            "set paths.results=... (or BENCH_RESULTS) to a writable directory") from None
    return path


def safetensors_params(directory: str | Path) -> int | None:
    """Number of parameters stored in a directory's *.safetensors files, from their headers only."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            try:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            except (struct.error, ValueError, MemoryError):
                return None  # not a readable header: loading will say so in its own words
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup "max" = no limit


def available_bytes() -> int | None:
    """The least of: MemAvailable, the cgroup's headroom, the address-space rlimit's headroom."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    cg_max, cg_cur = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if cg_max is not None and cg_cur is not None:
        limits.append(cg_max - cg_cur)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        mapped = 0
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmSize:"):
                    mapped = int(line.split()[1]) * 1024
        except OSError:
            pass
        limits.append(soft - mapped)
    return min(limits) if limits else None


def check_fits(spec) -> None:
    """Raise a one-line ResourceError when `spec`'s model cannot fit; silent when it cannot be estimated."""
    path = Path(spec.name_or_path) if spec.source == "hf" and spec.name_or_path else None
    if path is None or not path.is_dir():
        return
    n_params = safetensors_params(path)
    available = available_bytes()
    if n_params is None or available is None:
        return
    need = n_params * _DTYPE_BYTES.get(spec.dtype, 4) * COPIES
    if need > available:
        raise ResourceError(
            f"model '{spec.name_or_path}' needs at least {need / 2**30:.2f} GiB ({n_params / 1e6:.1f}M parameters x "
            f"{_DTYPE_BYTES.get(spec.dtype, 4)} bytes ({spec.dtype}) x {COPIES} copies), only "
            f"{max(available, 0) / 2**30:.2f} GiB is available",
            "free memory, raise cell_memory_gb, or use a smaller model")
