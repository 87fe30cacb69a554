"""MLflow lifecycle: one run per (model, method, calib, budget, task, backend, seed).

Default store: a local sqlite database under `results/` (MLFLOW_TRACKING_URI overrides). Each run gets the
flattened config as params, all metrics, tags for the config hash, git commit, package versions, machine and
the plug-in names, and artifacts (resolved config, per-layer statistics, per-sample results). A run that
raises ends FAILED with the error in its tags.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.tracking import MlflowClient

from bench import record
from bench.errors import ResourceError
from bench.preflight import writable_dir

EXPERIMENT = "bench"
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "lm_eval", "accelerate", "peft", "datasets",
            "hydra-core", "mlflow", "numpy", "bench")
_SOURCE_ROOT = Path(__file__).resolve().parents[1]


def retry(fn, *args, attempts: int = 30, **kwargs):
    """Call an MLflow function, retrying while a concurrent writer holds the sqlite lock; a lock that outlasts
    every attempt (each waits up to MLflow's 20 s busy timeout) is a one-line ResourceError."""
    t0 = time.monotonic()
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # sqlalchemy OperationalError, wrapped or not, depending on the call
            text = str(e).lower()
            if not ("locked" in text or "busy" in text):
                raise
            if i == attempts - 1:
                raise ResourceError(f"the MLflow store {mlflow.get_tracking_uri()} stayed locked by another "
                                    f"process for {time.monotonic() - t0:.0f} s ({attempts} attempts)",
                                    "let the other writer finish, or point paths.results (or MLFLOW_TRACKING_URI)"
                                    " at another store") from None
            time.sleep(min(0.05 * 2**i, 2.0))


def tracking_uri(results_dir: str | Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    path = writable_dir(results_dir)
    return f"sqlite:///{path / 'mlflow.db'}"



def setup(results_dir: str | Path) -> str:
    uri = tracking_uri(results_dir)
    mlflow.set_tracking_uri(uri)
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if retry(mlflow.get_experiment_by_name, EXPERIMENT) is None:
        art = Path(results_dir).resolve() / "mlartifacts"
        with contextlib.suppress(Exception):  # a concurrent worker may have created it first
            mlflow.create_experiment(EXPERIMENT, artifact_location=art.as_uri())
    retry(mlflow.set_experiment, EXPERIMENT)
    return uri


@functools.lru_cache(maxsize=1)
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
            "memory_limit": memory_limit(), "platform": platform.platform(), "python": platform.python_version()}


def memory_limit() -> str:
    """The limits this process runs under: its address-space rlimit and its cgroup's memory.max."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    rl = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft / 2**30:.1f}GiB"
    cg = "none"
    with contextlib.suppress(OSError):
        cg = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    return f"rlimit_as={rl} cgroup={cg}"


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
        self.run = retry(mlflow.start_run, run_name=self.name)
        self.id = self.run.info.run_id
        self.tag({**self.tags, record.PID: os.getpid(), record.HOST: socket.gethostname()})
        items = list(flatten(self.params).items())
        for i in range(0, len(items), 100):
            retry(mlflow.log_params, dict(items[i:i + 100]))
        return self

    def metrics(self, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            retry(mlflow.log_metrics, clean)

    def tag(self, tags: dict) -> None:
        retry(mlflow.set_tags, {k: str(v) for k, v in tags.items()})
        self.tags = {**self.tags, **tags}  # every tag the run has, for what the caller reports of it

    def json_artifact(self, obj, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(json.dumps(obj, indent=1, default=str))
            retry(mlflow.log_artifact, str(p))

    def text_artifact(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(text)
            retry(mlflow.log_artifact, str(p))

    def file_artifact(self, path: str) -> None:
        retry(mlflow.log_artifact, str(path))

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            retry(mlflow.end_run, "FINISHED")
            return False
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            self.tag({record.ERROR: f"{type(exc).__name__}: {exc}"[:5000]})
        retry(mlflow.end_run, status)
        return False


def artifact_text(client: MlflowClient, run, name: str) -> str | None:
    """A run's artifact as text, None if the run has none by that name: read in place from a local store,
    downloaded from a remote one."""
    uri = run.info.artifact_uri
    if uri.startswith("file:"):
        path = Path(unquote(urlparse(uri).path)) / name
        return path.read_text() if path.is_file() else None
    with tempfile.TemporaryDirectory() as d:
        try:
            return Path(client.download_artifacts(run.info.run_id, name, d)).read_text()
        except Exception:  # noqa: BLE001 - MLflow raises its own error types for a missing artifact
            return None


def find_runs(filter_tags: dict[str, str], status: str = "FINISHED") -> list:
    """Runs with `status` whose tags equal `filter_tags` (newest first)."""
    client = MlflowClient()
    exp = retry(client.get_experiment_by_name, EXPERIMENT)
    if exp is None:
        return []
    clauses = [f"tags.`{k}` = '{v}'" for k, v in filter_tags.items()]
    clauses.append(f"attributes.status = '{status}'")
    return retry(client.search_runs, [exp.experiment_id], " and ".join(clauses),
                 order_by=["attributes.start_time DESC"])


def find_finished(filter_tags: dict[str, str]) -> list:
    return find_runs(filter_tags, "FINISHED")


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


def close_stale_runs(config_hash: str) -> int:
    """Mark RUNNING runs of this cell whose process is gone (a killed sweep) as KILLED."""
    client, n = MlflowClient(), 0
    for r in find_runs({record.CONFIG_HASH: config_hash}, "RUNNING"):
        t = r.data.tags
        if t.get(record.HOST) == socket.gethostname() and not _pid_alive(t.get(record.PID, "")):
            retry(client.set_tag, r.info.run_id, record.ERROR, "process gone while RUNNING (sweep killed)")
            retry(client.set_terminated, r.info.run_id, "KILLED")
            n += 1
    return n


def fail_open_runs(config_hash: str, error: str) -> None:
    """A cell's worker died: close its still-RUNNING runs as FAILED with the reason."""
    client = MlflowClient()
    for r in find_runs({record.CONFIG_HASH: config_hash}, "RUNNING"):
        retry(client.set_tag, r.info.run_id, record.ERROR, error[:5000])
        retry(client.set_terminated, r.info.run_id, "FAILED")


def record_failure(name: str, params: dict, tags: dict, error: str) -> str:
    """A FAILED run for a cell that failed before its own run could start (e.g. a bad config value)."""
    run = Run(name, params, tags).__enter__()
    run.tag({record.ERROR: error[:5000]})
    retry(mlflow.end_run, "FAILED")
    return run.id
