"""Sweeps: failed cells recorded and the rest go on, resume after a kill, concurrent writers lose no run,
and Hydra's submitit_local launcher runs the smoke sweep."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, mlflow_runs, run_cli, tiny_cli_args

PLUGINS = Path(__file__).parent / "plugins"


def _statuses(runs):
    return sorted((r.data.tags.get("bench.method", "?"), r.info.status) for r in runs)


def test_sweep_of_6_cells_with_failing_ones(results_dir, tiny_llama_dir):
    r = run_cli("-m", *tiny_cli_args(tiny_llama_dir), "compare_baseline=false", "method=rtn",
                "method.bits=2,4,8", "method.group_size=32,200", results=results_dir)
    # group_size=200 exceeds the tiny model's 128-wide layers: those 3 cells fail, the 3 others finish
    assert r.returncode == 1, r.stderr[-2000:]
    assert "3 finished, 3 failed, 0 skipped, 0 unsupported" in r.stdout
    assert "group_size=200 does not fit in_features=128" in r.stdout
    runs = mlflow_runs(results_dir)
    assert sorted(x.info.status for x in runs) == ["FAILED"] * 3 + ["FINISHED"] * 3
    assert all("group_size=200" in x.data.tags["error"] for x in runs if x.info.status == "FAILED")
    # re-running the same sweep skips every finished cell and re-runs only the failed ones
    r = run_cli("-m", *tiny_cli_args(tiny_llama_dir), "compare_baseline=false", "method=rtn",
                "method.bits=2,4,8", "method.group_size=32,200", results=results_dir)
    assert "0 finished, 3 failed, 3 skipped" in r.stdout
    assert len([x for x in mlflow_runs(results_dir) if x.info.status == "FINISHED"]) == 3


def test_a_crashing_cell_does_not_stop_the_sweep(results_dir, tiny_llama_dir):
    r = run_cli("-m", *tiny_cli_args(tiny_llama_dir), "compare_baseline=false", "method=none,explode,sign",
                f"hydra.searchpath=[file://{PLUGINS}]", results=results_dir)
    assert r.returncode == 1
    assert "2 finished, 1 failed" in r.stdout and "boom" in r.stdout
    assert _statuses(mlflow_runs(results_dir)) == [("explode", "FAILED"), ("none", "FINISHED"),
                                                    ("sign", "FINISHED")]


def test_kill_mid_sweep_then_resume_loses_nothing_and_duplicates_nothing(results_dir, tiny_llama_dir):
    args = ["-m", *tiny_cli_args(tiny_llama_dir), "compare_baseline=false", "method=rtn",
            "method.bits=2,3,4,8", "method.group_size=32"]
    env = {**os.environ, "BENCH_RESULTS": str(results_dir), "PYTHONPATH": str(PLUGINS)}
    proc = subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 900  # generous: a loaded machine is slow, a fast one does not wait
    while time.time() < deadline:  # wait for the first finished cell's status file (not the store: it is
        done = [p for p in (results_dir / "sweeps").glob("*/*.json")]  # being created by the sweep itself)
        if any(json.loads(p.read_text())["status"] == "finished" for p in done):
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = {x.data.tags["bench.config_hash"] for x in mlflow_runs(results_dir)
                       if x.info.status == "FINISHED"}
    assert 1 <= len(finished_before) < 4
    r = run_cli(*args, results=results_dir)
    assert r.returncode == 0, r.stdout[-2000:]
    assert f"{len(finished_before)} skipped" in r.stdout
    runs = mlflow_runs(results_dir)
    finished = [x.data.tags["bench.config_hash"] for x in runs if x.info.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == 4  # every cell once, none duplicated
    assert finished_before <= set(finished)
    assert all(x.info.status in ("FINISHED", "KILLED") for x in runs)  # the interrupted run was closed


def _writer(results: str, worker: int, n: int) -> None:
    from bench import tracking

    tracking.setup(results)
    for i in range(n):
        with tracking.Run(f"w{worker}-{i}", {"worker": worker, "i": i}, {"bench.method": f"w{worker}"}) as run:
            run.metrics({"value": float(i)})


def test_four_concurrent_writers_lose_no_run(results_dir):
    from bench import tracking

    tracking.setup(results_dir)  # created and migrated once, before the workers start
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(results_dir), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    runs = mlflow_runs(results_dir)
    assert len(runs) == 100 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted((r.data.params["worker"], r.data.params["i"]) for r in runs) == sorted(
        (str(w), str(i)) for w in range(4) for i in range(25))


def test_submitit_local_launcher_runs_the_smoke_sweep(results_dir, tiny_llama_dir):
    r = run_cli("sweep=smoke", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
                "model=hf", f"model.name_or_path={tiny_llama_dir}", "task.seqlen=64", "compare_baseline=false",
                results=results_dir)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "3 finished, 0 failed" in r.stdout
    assert _statuses(mlflow_runs(results_dir)) == [("none", "FINISHED"), ("rtn", "FINISHED"), ("sign", "FINISHED")]
    status_files = list((results_dir / "sweeps").glob("*/*.json"))
    assert len(status_files) == 3 and all(json.loads(p.read_text())["status"] == "finished" for p in status_files)
