"""Published records: one self-contained, schema-versioned JSON file per finished run (docs/records.md).

`python -m bench export` writes chosen FINISHED runs of an MLflow store into a committed folder
(`leaderboard/records/` by default); `python -m bench import` loads records into any MLflow store, once each;
`python -m bench leaderboard` reads the folder beside the local store. A record holds what the leaderboard and a
reader need and nothing else: the cell's resolved config, every metric under its protocol name (storage, latency,
energy with its source, memory, training), every tag (git commit, package versions, machine, threads, precision,
base-weights and calibration sha256, training convergence), the task metrics with their per-sample values
(zlib-compressed float64, base64) and the `python -m bench ...` line that reproduces the cell. No weights and no
other artifacts.

A record is refused, with one line naming its file and the field, when its schema is not this one, a required
field is missing or mistyped, its checksum does not match its content, its id or file name does not follow from
its content, its config does not hash to its cell hash, its command was not checked to reproduce the cell, or its
git commit is unknown. Export writes only records that pass the same check.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import re
import sys
import time
import zlib
from pathlib import Path

import mlflow
import numpy as np
import yaml
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bench import record, tracking
from bench.errors import BenchError

SCHEMA = "bench.record"
SCHEMA_VERSION = 1
RECORDS_DIR = "leaderboard/records"
PER_SAMPLE_ENCODING = "zlib-float64le-base64"
# local facts of the machine's store, not of the result: never published
UNPUBLISHED_TAGS = {record.PID, record.HOST, record.CACHE, record.ARTIFACT_KEY, record.CACHE_DISCARDED,
                    record.RECORD_ID, record.RECORD_FILE}
REQUIRED_TAGS = (record.METHOD, record.TASK, record.MODEL, record.HARDWARE, record.CALIB, record.BUDGET, record.SEED,
                 record.THREADS, record.PRECISION, record.STAGES, record.EXECUTION, record.CONFIG_HASH,
                 record.GIT_COMMIT, record.MODEL_WEIGHTS_SHA256, record.COMMAND, record.COMMAND_CHECK,
                 record.PRIMARY_METRIC, f"{record.VERSION_PREFIX}torch", f"{record.VERSION_PREFIX}bench",
                 f"{record.MACHINE_PREFIX}cpu", f"{record.MACHINE_PREFIX}cores")
_COMMIT = re.compile(r"[0-9a-f]{40}(-dirty)?")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RecordError(BenchError):
    """A published record is broken: its file and the field are named."""


def _refuse(where: str, field: str, problem: str, fix: str) -> RecordError:
    return RecordError(f"record {where}: field '{field}' {problem}", fix)


# --- per-sample values ----------------------------------------------------------------------------------------------
def encode_values(values: list[float]) -> dict:
    """Per-sample values, exactly (float64), compressed: per-window NLLs or per-example 0/1 correctness."""
    raw = np.asarray(values, dtype="<f8").tobytes()
    return {"encoding": PER_SAMPLE_ENCODING, "n": len(values),
            "data": base64.b64encode(zlib.compress(raw, 9)).decode("ascii")}


def decode_values(enc: dict) -> list[float]:
    if enc.get("encoding") != PER_SAMPLE_ENCODING:
        raise ValueError(f"encoding {enc.get('encoding')!r} is not {PER_SAMPLE_ENCODING}")
    values = np.frombuffer(zlib.decompress(base64.b64decode(enc["data"], validate=True)), dtype="<f8")
    if values.size != enc["n"]:
        raise ValueError(f"holds {values.size} values, not n={enc['n']}")
    return values.tolist()


# --- one record -----------------------------------------------------------------------------------------------------
def checksum(rec: dict) -> str:
    body = {k: v for k, v in rec.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:40].strip("._") or "x"


def file_name(rec: dict) -> str:
    """`<method>__<task>__<record id>.json`: stable, derived from the content."""
    t = rec["tags"]
    return f"{_safe(t[record.METHOD])}__{_safe(t[record.TASK])}__{rec['record_id']}.json"


def build(run_info: dict, tags: dict, metrics: dict, config: dict, task_metrics: list,
          task_metrics_deployed: list | None) -> dict:
    """The record of one finished run. `run_info`: name, status, start_time, end_time (ms), source_run_id."""
    published_tags = {k: str(v) for k, v in sorted(tags.items())
                      if k not in UNPUBLISHED_TAGS and not k.startswith("mlflow.")}

    def per_sample(ms):
        return [{**m, "per_sample": encode_values(m["per_sample"]) if m.get("per_sample") is not None else None}
                for m in ms]

    rec = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
           "record_id": record.record_id(tags.get(record.CONFIG_HASH, ""), tags.get(record.GIT_COMMIT, ""),
                                         run_info["start_time"]),
           "command": tags.get(record.COMMAND, ""), "run": run_info, "config": record.cell_identity(config),
           "metrics": dict(sorted(metrics.items())), "tags": published_tags, "task_metrics": per_sample(task_metrics)}
    if task_metrics_deployed is not None:
        rec["task_metrics_deployed"] = per_sample(task_metrics_deployed)
    rec["sha256"] = checksum(rec)
    return rec


def validate(rec, where: str, name: str | None = None) -> dict:
    """`rec` if it is a sound record of this schema; otherwise RecordError naming `where` and the field. `name`: the
    file name it is stored under, which must follow from its content."""
    again = "export it again from its MLflow run (python -m bench export), or restore the committed file"
    if not isinstance(rec, dict):
        raise _refuse(where, "(top level)", "is not a JSON object", again)
    if rec.get("schema") != SCHEMA:
        raise _refuse(where, "schema", f"is {rec.get('schema')!r}, not {SCHEMA!r}", "this file is not a bench record")
    if rec.get("schema_version") != SCHEMA_VERSION:
        raise _refuse(where, "schema_version", f"is {rec.get('schema_version')!r}; this bench reads version "
                      f"{SCHEMA_VERSION}", "read it with the bench version that wrote it, or export it again")
    for key, kind in (("record_id", str), ("command", str), ("run", dict), ("config", dict), ("metrics", dict),
                      ("tags", dict), ("task_metrics", list), ("sha256", str)):
        if not isinstance(rec.get(key), kind):
            raise _refuse(where, key, "is missing" if key not in rec else f"is not a {kind.__name__}", again)
    if checksum(rec) != rec["sha256"]:
        raise _refuse(where, "sha256", "does not match the record's content (edited after export?)", again)
    tags, metrics, run = rec["tags"], rec["metrics"], rec["run"]
    for key in REQUIRED_TAGS:
        if not isinstance(tags.get(key), str) or not tags[key]:
            raise _refuse(where, f"tags.{key}", "is missing", again)
    if not _COMMIT.fullmatch(tags[record.GIT_COMMIT]):
        raise _refuse(where, f"tags.{record.GIT_COMMIT}", f"is {tags[record.GIT_COMMIT]!r}, not a git commit",
                      "publish only runs made from a git checkout")
    for key in (record.MODEL_WEIGHTS_SHA256,) + ((record.CALIB_SHA256,) if record.CALIB_SET in tags else ()):
        if not _SHA256.fullmatch(tags.get(key) or ""):
            raise _refuse(where, f"tags.{key}", "is not a sha256", again)
    if tags[record.COMMAND] != rec["command"] or tags[record.COMMAND_CHECK] != "reproduces":
        raise _refuse(where, f"tags.{record.COMMAND_CHECK}", f"is {tags[record.COMMAND_CHECK]!r}: the command was not "
                      "checked to reproduce the cell", "run the cell again with this bench to record a checked command")
    if record.config_hash(record.cell_identity(rec["config"])) != tags[record.CONFIG_HASH]:
        raise _refuse(where, "config", f"does not hash to tags.{record.CONFIG_HASH}", again)
    for key, kind in (("status", str), ("start_time", int), ("end_time", int), ("name", str)):
        if not isinstance(run.get(key), kind):
            raise _refuse(where, f"run.{key}", "is missing" if key not in run else f"is not a {kind.__name__}", again)
    if run["status"] != "FINISHED":
        raise _refuse(where, "run.status", f"is {run['status']!r}", "publish only FINISHED runs")
    rid = record.record_id(tags[record.CONFIG_HASH], tags[record.GIT_COMMIT], run["start_time"])
    if rec["record_id"] != rid:
        raise _refuse(where, "record_id", f"is not {rid}, the id of its cell, commit and start time", again)
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _refuse(where, f"metrics.{k}", f"is {v!r}, not a finite number", again)
    head = tags[record.PRIMARY_METRIC]
    if head not in metrics or record.direction_tag(head) not in tags:
        raise _refuse(where, f"metrics.{head}", "(the primary metric) is missing or has no direction tag", again)
    for list_key in ("task_metrics", "task_metrics_deployed"):
        for i, m in enumerate(rec.get(list_key) or []):
            _check_task_metric(m, f"{list_key}[{i}]", where, metrics if list_key == "task_metrics" else None, again)
    if name is not None and name != file_name(rec):
        raise _refuse(where, "record_id", f"does not match the file name (expected {file_name(rec)})",
                      f"rename the file to {file_name(rec)}")
    return rec


def _check_task_metric(m, field: str, where: str, metrics: dict | None, again: str) -> None:
    if not isinstance(m, dict) or not isinstance(m.get("name"), str):
        raise _refuse(where, f"{field}.name", "is missing", again)
    value = m.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _refuse(where, f"{field}.value", f"is {value!r}, not a finite number", again)
    if metrics is not None:
        if m.get("direction") not in ("lower", "higher"):
            raise _refuse(where, f"{field}.direction", f"is {m.get('direction')!r}, not lower or higher", again)
        if metrics.get(m["name"]) != value:
            raise _refuse(where, f"{field}.value", f"differs from metrics.{m['name']}", again)
    if m.get("per_sample") is not None:
        try:
            decode_values(m["per_sample"])
        except (ValueError, KeyError, TypeError, AttributeError, zlib.error) as e:
            raise _refuse(where, f"{field}.per_sample", f"cannot be decoded ({e})", again) from None


def decoded(task_metrics: list) -> list:
    """Task metrics with their per-sample values as plain lists (as the runner's task_metrics.json holds them)."""
    return [{**m, "per_sample": decode_values(m["per_sample"]) if m.get("per_sample") is not None else None}
            for m in task_metrics]


def read(path: Path) -> dict:
    """One record file, validated."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise RecordError(f"record {path}: not UTF-8 text", "restore the committed file") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"record {path}: not valid JSON (line {e.lineno}: {e.msg})", "restore the committed file") \
            from None
    return validate(rec, str(path), path.name)


def record_files(paths: list[str | Path]) -> list[Path]:
    """Record files named directly or found (`*.json`, recursively) in the directories named."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.rglob("*.json"))
        elif p.is_file():
            out.append(p)
        else:
            raise RecordError(f"record {p}: no such file or directory", f"give a record file or a folder such as "
                              f"{RECORDS_DIR}")
    return out


def read_all(paths: list[str | Path]) -> list[tuple[Path, dict]]:
    """Every record under `paths`, each validated; a duplicate record id is refused too."""
    seen: dict[str, Path] = {}
    out = []
    for p in record_files(paths):
        rec = read(p)
        if rec["record_id"] in seen:
            raise _refuse(str(p), "record_id", f"duplicates {seen[rec['record_id']]}", "keep one of the two files")
        seen[rec["record_id"]] = p
        out.append((p, rec))
    return out


def write(rec: dict, out_dir: Path) -> Path:
    from bench.cache import atomic_write_bytes  # here, not above: bench.cache imports torch, which reading never needs

    path = Path(out_dir) / file_name(rec)
    atomic_write_bytes(path, (json.dumps(rec, indent=1, sort_keys=True, allow_nan=False) + "\n").encode())
    return path


# --- MLflow side ----------------------------------------------------------------------------------------------------
def _client(results: str) -> MlflowClient:
    tracking.setup(results)
    return MlflowClient()


def from_run(client: MlflowClient, run, allow_dirty: bool = False) -> dict:
    """The record of an MLflow run, validated; RecordError naming the run and the field otherwise."""
    where = f"of run {run.info.run_id}"
    tags = run.data.tags
    if run.info.status != "FINISHED":
        raise RecordError(f"record {where}: run.status is {run.info.status}", "export only FINISHED runs")
    if tags.get(record.GIT_COMMIT, "").endswith("-dirty") and not allow_dirty:
        raise RecordError(f"record {where}: field 'tags.{record.GIT_COMMIT}' is {tags[record.GIT_COMMIT]!r}: the "
                          "code that ran is not that commit", "run it again from a clean checkout, or pass "
                          "--allow-dirty (the site marks such rows)")
    text = tracking.artifact_text(client, run, record.CONFIG_FILE)
    metrics_text = tracking.artifact_text(client, run, record.TASK_METRICS_FILE)
    if text is None or metrics_text is None:
        missing = record.CONFIG_FILE if text is None else record.TASK_METRICS_FILE
        raise RecordError(f"record {where}: artifact '{missing}' is missing", "run the cell again to record it")
    deployed = tracking.artifact_text(client, run, record.TASK_METRICS_DEPLOYED_FILE)
    info = {"name": run.info.run_name or "", "status": run.info.status, "start_time": int(run.info.start_time),
            "end_time": int(run.info.end_time or run.info.start_time), "source_run_id": run.info.run_id}
    rec = build(info, tags, dict(run.data.metrics), yaml.safe_load(text), json.loads(metrics_text),
                json.loads(deployed) if deployed is not None else None)
    return validate(rec, where)


def find_runs(client: MlflowClient, experiment: str, run_ids: list[str], sweep: str | None, tags: list[str],
              every: bool) -> list:
    exp = tracking.retry(client.get_experiment_by_name, experiment)
    if exp is None:
        raise RecordError(f"no experiment '{experiment}' in the store {mlflow.get_tracking_uri()}",
                          "pass --results DIR (or MLFLOW_TRACKING_URI) of the store that holds the runs")
    if run_ids:
        try:
            return [tracking.retry(client.get_run, rid) for rid in run_ids]
        except MlflowException as e:
            raise BenchError(f"no such run in the store {mlflow.get_tracking_uri()}: {str(e).splitlines()[0]}",
                             "check the run ids (python -m bench leaderboard lists them), or --results") from None
    clauses = ["attributes.status = 'FINISHED'"]
    if sweep:
        clauses.append(f"tags.`{record.SWEEP}` = '{sweep}'")
    for t in tags:
        key, sep, value = t.partition("=")
        if not sep:
            raise BenchError(f"--tag {t!r} is not KEY=VALUE", f"e.g. --tag {record.METHOD}=gptq")
        clauses.append(f"tags.`{key}` = '{value}'")
    if len(clauses) == 1 and not every:
        raise BenchError("no runs chosen", "name them: --run-id ID, --sweep ID, --tag KEY=VALUE, or --all")
    runs, token = [], None
    while True:
        page = tracking.retry(client.search_runs, [exp.experiment_id], " and ".join(clauses), max_results=5000,
                              page_token=token, order_by=["attributes.start_time ASC"])
        runs += page
        token = page.token
        if not token:
            return runs


def export(results: str, out_dir: str, experiment: str = "bench", run_ids: list[str] = (), sweep: str | None = None,
           tags: list[str] = (), every: bool = False, allow_dirty: bool = False) -> list[Path]:
    """Write the chosen FINISHED runs as records; none is written if any is broken (each problem is reported)."""
    client = _client(results)
    runs = find_runs(client, experiment, list(run_ids), sweep, list(tags), every)
    recs, problems = [], []
    for run in runs:
        try:
            recs.append(from_run(client, run, allow_dirty))
        except RecordError as e:
            problems.append(str(e))
    if problems:
        raise RecordError(problems[0] + (f" (and {len(problems) - 1} more run(s) refused)" if len(problems) > 1
                                         else ""), "nothing was written")
    return [write(rec, Path(out_dir)) for rec in recs]


def import_records(paths: list[str | Path], results: str) -> tuple[list[str], list[str]]:
    """Load records into the store at `results` (or MLFLOW_TRACKING_URI): (imported, already there) record ids.
    Every record is validated before any is imported."""
    found = read_all(paths)
    client = _client(results)
    exp = tracking.retry(client.get_experiment_by_name, tracking.EXPERIMENT)
    imported, present = [], []
    for path, rec in found:
        rid, tags, run = rec["record_id"], rec["tags"], rec["run"]
        same = tracking.find_finished({record.CONFIG_HASH: tags[record.CONFIG_HASH],
                                       record.GIT_COMMIT: tags[record.GIT_COMMIT]})
        if tracking.find_finished({record.RECORD_ID: rid}) or any(r.info.start_time == run["start_time"] for r in same):
            present.append(rid)
            continue
        created = tracking.retry(client.create_run, exp.experiment_id, start_time=run["start_time"],
                                 run_name=run["name"],
                                 tags={**tags, record.RECORD_ID: rid, record.RECORD_FILE: path.name})
        run_id = created.info.run_id
        try:  # a failure half-way leaves no RUNNING run behind: it is closed FAILED, and imported again next time
            stamp = int(time.time() * 1000)
            metrics = [Metric(k, float(v), stamp, 0) for k, v in rec["metrics"].items()]
            params = [Param(k, v) for k, v in tracking.flatten(rec["config"]).items()]
            for i in range(0, max(len(metrics), len(params)), 100):
                tracking.retry(client.log_batch, run_id, metrics=metrics[i:i + 100], params=params[i:i + 100])
            tracking.retry(client.log_text, run_id, json.dumps(decoded(rec["task_metrics"]), indent=1),
                           record.TASK_METRICS_FILE)
            if "task_metrics_deployed" in rec:
                tracking.retry(client.log_text, run_id, json.dumps(decoded(rec["task_metrics_deployed"]), indent=1),
                               record.TASK_METRICS_DEPLOYED_FILE)
            tracking.retry(client.log_text, run_id, yaml.safe_dump(rec["config"], sort_keys=False), record.CONFIG_FILE)
            tracking.retry(client.set_terminated, run_id, "FINISHED", end_time=run["end_time"])
        except BaseException:
            tracking.retry(client.set_terminated, run_id, "FAILED")
            raise
        imported.append(rid)
    return imported, present


# --- command lines ----------------------------------------------------------------------------------------------------
def _results_default() -> str:
    return os.environ.get("BENCH_RESULTS", "results")


def main_export(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench export", description="Write chosen FINISHED runs of an "
                                 "MLflow store as published records (one JSON file each; docs/records.md).")
    ap.add_argument("--results", default=_results_default(), help="results directory holding mlflow.db "
                    "(default: $BENCH_RESULTS or results; MLFLOW_TRACKING_URI wins)")
    ap.add_argument("--out", default=RECORDS_DIR, help=f"folder of the records (default: {RECORDS_DIR})")
    ap.add_argument("--experiment", default="bench", help="MLflow experiment (default: bench)")
    ap.add_argument("--run-id", nargs="+", default=[], help="these runs")
    ap.add_argument("--sweep", help="the FINISHED runs of this sweep id (bench.sweep)")
    ap.add_argument("--tag", action="append", default=[], help="only FINISHED runs with this tag, KEY=VALUE "
                    "(repeatable, all must hold), e.g. --tag bench.method=gptq")
    ap.add_argument("--all", action="store_true", help="every FINISHED run of the experiment")
    ap.add_argument("--allow-dirty", action="store_true", help="also runs made from a checkout with uncommitted "
                    "changes (their commit is marked -dirty)")
    args = ap.parse_args(argv)
    written = export(args.results, args.out, args.experiment, args.run_id, args.sweep, args.tag, args.all,
                     args.allow_dirty)
    for p in written:
        print(p)
    print(f"exported {len(written)} record(s) to {args.out}")
    return 0


def main_import(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench import", description="Load published records into an MLflow "
                                 "store; a record already there is not imported again.")
    ap.add_argument("paths", nargs="*", default=[RECORDS_DIR], help=f"record files or folders (default: {RECORDS_DIR})")
    ap.add_argument("--results", default=_results_default(), help="results directory holding mlflow.db "
                    "(default: $BENCH_RESULTS or results; MLFLOW_TRACKING_URI wins)")
    args = ap.parse_args(argv)
    imported, present = import_records(args.paths, args.results)
    print(f"imported {len(imported)} record(s); {len(present)} already in the store")
    return 0


def run_cli(main, argv: list[str]) -> int:
    """A subcommand's errors as the CLI prints them: one line, exit status 2."""
    try:
        return main(argv)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return e.exit_code
