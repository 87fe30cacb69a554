"""cuda: on a machine without a usable GPU, `hardware=cuda` is one line when the config is built, before
anything runs or is recorded; NVML energy is optional and its absence is a stated reason."""

from __future__ import annotations

import pytest
import torch

from bench.errors import ResourceError
from conftest import compose

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the backend runs")

LINE = (f"bench: error: hardware 'cuda' needs an NVIDIA GPU, but torch {torch.__version__} is a CPU-only build; "
        "run on a machine with a GPU and a CUDA build of torch, or choose hardware=cpu or hardware=cpu_kernels\n")


def test_cuda_without_a_gpu_is_one_line_before_anything_runs(results_dir, capsys):
    """What `python -m bench hardware=cuda` does, in-process (a subprocess costs seconds): the Runner is built
    from the composed config, its error printed by the CLI's own printer."""
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch without a visible GPU gives the other line")
    from bench import app
    from bench.runner import Runner

    with pytest.raises(ResourceError) as raised:
        Runner(compose("hardware=cuda", "threads=1", f"paths.results={results_dir}"))
    with pytest.raises(SystemExit) as exited:
        app._fail(raised.value)
    assert (exited.value.code, capsys.readouterr().err) == (2, LINE)
    assert not (results_dir / "mlflow.db").exists()


def test_missing_nvml_is_a_reason_not_an_error(monkeypatch):
    import builtins

    from bench.hardware.cuda import NvmlMeter

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "pynvml" else real_import(name, *a, **k))
    meter = NvmlMeter(0)
    assert meter.handle is None and meter.reason == "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
