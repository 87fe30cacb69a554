"""MLflow lifecycle: one run per (model, method, calib, budget, task, backend, seed).

Default store: a local sqlite database under `results/` (MLFLOW_TRACKING_URI overrides). Each run gets the
flattened config as params, all metrics, tags for the config hash, git commit, package versions, machine and
the plug-in names, and artifacts (resolved config, per-layer statistics, per-sample results). A run that
raises ends FAILED with the error in its tags.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

EXPERIMENT = "bench"
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "lm_eval", "accelerate", "peft", "datasets",
            "hydra-core", "mlflow", "numpy", "bench")
_SOURCE_ROOT = Path(__file__).resolve().parents[1]


def tracking_uri(results_dir: str | Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    path = Path(results_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def setup(results_dir: str | Path) -> str:
    uri = tracking_uri(results_dir)
    mlflow.set_tracking_uri(uri)
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        art = Path(results_dir).resolve() / "mlartifacts"
        with contextlib.suppress(Exception):  # a concurrent worker may have created it first
            mlflow.create_experiment(EXPERIMENT, artifact_location=art.as_uri())
    mlflow.set_experiment(EXPERIMENT)
    return uri


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_SOURCE_ROOT, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_SOURCE_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.1f}GiB"
    return {"host": socket.gethostname(), "cpu": cpu, "cores": str(os.cpu_count()), "memory": mem,
            "platform": platform.platform(), "python": platform.python_version()}


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


class Run:
    """Context manager around one MLflow run; marks FAILED (with the error) on any exception."""

    def __init__(self, name: str, params: dict, tags: dict):
        self.name, self.params, self.tags = name, params, tags

    def __enter__(self) -> Run:
        self.run = mlflow.start_run(run_name=self.name)
        self.id = self.run.info.run_id
        mlflow.set_tags({k: str(v) for k, v in self.tags.items()})
        params = flatten(self.params)
        items = list(params.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i:i + 100]))
        return self

    def metrics(self, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            mlflow.log_metrics(clean)

    def tag(self, tags: dict) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def json_artifact(self, obj, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(json.dumps(obj, indent=1, default=str))
            mlflow.log_artifact(str(p))

    def text_artifact(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(text)
            mlflow.log_artifact(str(p))

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            mlflow.end_run("FINISHED")
            return False
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            mlflow.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000], "status_reason": status})
        mlflow.end_run(status)
        return False


def find_finished(filter_tags: dict[str, str]) -> list:
    """FINISHED runs whose tags equal `filter_tags` (newest first)."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    clauses = [f"tags.`{k}` = '{v}'" for k, v in filter_tags.items()]
    clauses.append("attributes.status = 'FINISHED'")
    return client.search_runs([exp.experiment_id], " and ".join(clauses), order_by=["attributes.start_time DESC"])


def now() -> float:
    return time.time()
