"""cuda: on a machine without a usable GPU, `hardware=cuda` is one line when the config is built, before
anything runs or is recorded; NVML energy is optional and its absence is a stated reason."""

from __future__ import annotations

import pytest
import torch

from bench.errors import ResourceError
from conftest import run_cli

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the backend runs")

LINE = (f"bench: error: hardware 'cuda' needs an NVIDIA GPU, but torch {torch.__version__} is a CPU-only build; "
        "run on a machine with a GPU and a CUDA build of torch, or choose hardware=cpu or hardware=cpu_kernels\n")


def test_cuda_without_a_gpu_is_one_line_before_anything_runs(results_dir):
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch without a visible GPU gives the other line")
    r = run_cli("hardware=cuda", "threads=1", results=results_dir)
    assert (r.returncode, r.stderr) == (2, LINE)
    assert not (results_dir / "mlflow.db").exists()


def test_backend_refuses_to_build_without_a_gpu():
    from bench.hardware.cuda import CudaBackend

    with pytest.raises(ResourceError, match="hardware 'cuda' needs an NVIDIA GPU"):
        CudaBackend(threads=1)


def test_missing_nvml_is_a_reason_not_an_error(monkeypatch):
    import builtins

    from bench.hardware.cuda import NvmlMeter

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "pynvml" else real_import(name, *a, **k))
    meter = NvmlMeter(0)
    assert meter.handle is None and meter.reason == "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
