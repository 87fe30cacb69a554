"""Sweeps: Hydra multirun cells, each supervised in its own process, resumable, summarised at the end.

Launching is Hydra's job (joblib locally, submitit for SLURM, Ray): bench never schedules cells itself.
What bench adds inside each Hydra job:

- isolation: the cell runs in its own child process (forked from a server that imported the runner once),
  so a crash, an out-of-memory kill or a timeout (`cell_timeout_min`) of one cell is recorded as FAILED and
  the sweep goes on, whatever the launcher;
- resume: a cell whose config hash already has a FINISHED run in MLflow is skipped; a RUNNING run left by
  a killed sweep is closed as KILLED before its cell is re-run, so nothing is duplicated;
- a status file per cell under `results/sweeps/<sweep id>/`, from which the sweep's final table is printed
  (finished / failed / skipped / unsupported), with a non-zero exit status if any cell failed.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import signal
import sys
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bench import record, tracking
from bench.cache import atomic_write_bytes
from bench.errors import BenchError
from bench.record import SWEEP_ENV, cell_hash, cell_identity, sweep_id
from bench.reproduce import Launch


def new_sweep_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def status_dir(results: str, sid: str) -> Path:
    return Path(results) / "sweeps" / sid


# Imported once by the fork server, so cells fork with them loaded. The runner imports transformers' model code
# and MLflow's SQL store lazily, and those imports cost more than a small cell's whole run (measured: ~30 s of
# a tiny-model cell beside a busy process, of which ~25 s imports).
_FORKSERVER_PRELOAD = ["bench.runner", "transformers.modeling_utils", "transformers.models.llama.modeling_llama",
                       "mlflow.store.tracking.sqlalchemy_store", "git"]


def _cell_context():
    """Cells fork from a server process that imported the runner once (torch, transformers and MLflow cost
    seconds of CPU to import per cell under 'spawn'); 'spawn' where there is no forkserver."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ctx


def _child(container: dict, launch: Launch, result_path: str, sid: str) -> None:
    """Runs one cell in a fresh process and writes its outcome as JSON."""
    os.environ[SWEEP_ENV] = sid  # a forkserver started by an earlier sweep carries that sweep's environment
    cfg = OmegaConf.create(container)
    if cfg.get("cell_memory_gb"):
        limit = int(cfg.cell_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # imported in the worker only (the fork server preloads it): the sweep's own process never runs a cell, and
    # the runner's imports (torch, transformers) cost it ~10 s
    from bench.runner import Runner

    out: dict = {"status": "failed"}
    try:
        runner = Runner(cfg, launch)
        _, result = runner.run()
        unsupported = result.tags.get(record.HARDWARE_STATUS) == "unsupported"
        out = {"status": "unsupported" if unsupported else "finished", "run_id": result.run_id,
               "metrics": {k: result.metrics[k] for k in record.task_metric_names(result.tags)
                           if k in result.metrics}}
    except BenchError as e:
        out = {"status": "failed", "error": str(e)}
    except MemoryError:
        out = {"status": "failed", "error": "out of memory (MemoryError)"}
    except Exception as e:  # noqa: BLE001 - every failure is recorded, none stops the sweep
        out = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    atomic_write_bytes(Path(result_path), json.dumps(out).encode())


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (killed: out of memory?)" if -code == signal.SIGKILL else ""
        return f"worker died from {name}{hint}"
    return f"worker exited with status {code} before recording a result"


def run_cell(cfg: DictConfig, overrides: list[str]) -> dict:
    """One Hydra job of a sweep. Never raises: the outcome is returned and written as a status file."""
    sid = sweep_id() or new_sweep_id()
    results = cfg.paths.results
    tracking.setup(results)
    h = cell_hash(cfg)
    label = " ".join(overrides) or "(defaults)"
    tracking.close_stale_runs(h)
    t0 = time.time()
    prior = tracking.find_finished({record.CONFIG_HASH: h})
    if prior:
        status = {"status": "skipped", "run_id": prior[0].info.run_id, "reason": "already FINISHED in the store"}
    else:
        out_dir = status_dir(results, sid)
        out_dir.mkdir(parents=True, exist_ok=True)
        result_path = out_dir / f".{h}.result.json"
        result_path.unlink(missing_ok=True)
        container = OmegaConf.to_container(cfg, resolve=True)
        proc = _cell_context().Process(target=_child, args=(container, Launch.from_hydra(), str(result_path), sid),
                                       name=f"bench-cell-{h}")
        proc.start()
        timeout = cfg.get("cell_timeout_min")
        proc.join(timeout * 60 if timeout else None)
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            status = {"status": "failed", "error": f"timeout after {timeout} min (cell_timeout_min)"}
        elif result_path.exists():
            status = json.loads(result_path.read_text())
            result_path.unlink(missing_ok=True)
        else:
            status = {"status": "failed", "error": _describe_exit(proc.exitcode)}
        if status["status"] == "failed":
            tracking.fail_open_runs(h, status["error"])
            if not tracking.find_runs({record.CONFIG_HASH: h, record.SWEEP: sid}, "FAILED"):
                # it failed before its run started (e.g. a bad config value): record it all the same
                tracking.record_failure(label, cell_identity(cfg), {record.CONFIG_HASH: h, record.SWEEP: sid,
                                                                    record.CELL: label}, status["error"])
    status.update({"cell": label, "config_hash": h, "seconds": round(time.time() - t0, 1)})
    path = status_dir(results, sid) / f"{h}.json"
    atomic_write_bytes(path, json.dumps(status, default=str).encode())
    print(f"[bench sweep {sid}] {status['status'].upper():11s} {label}"
          + (f" -- {status['error']}" if status.get("error") else ""), flush=True)
    return status


def summary(results: str, sid: str) -> tuple[str, bool]:
    """The sweep's table (each cell's headline metric) and whether any cell failed."""
    rows, failed = [], False
    for p in sorted(status_dir(results, sid).glob("*.json")):
        s = json.loads(p.read_text())
        failed |= s["status"] == "failed"
        metric = next((f"{k}={record.fmt(v)}" for k, v in (s.get("metrics") or {}).items()), "")
        rows.append([s["status"], s["cell"], s.get("run_id", "-") or "-", metric, (s.get("error") or "")[:120]])
    counts = {k: sum(r[0] == k for r in rows) for k in ("finished", "failed", "skipped", "unsupported")}
    head = f"sweep {sid}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    body = record.table(["status", "cell", "mlflow run", "metric", "error"], rows) if rows else "(no cells ran)"
    return f"{head}\n{body}", failed


def is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") or a.startswith("sweep=") or a == "hydra.mode=MULTIRUN" for a in argv)


def print_summary_and_exit(results: str, sid: str) -> None:
    text, failed = summary(results, sid)
    print("\n" + text, flush=True)
    if failed:
        sys.exit(1)
