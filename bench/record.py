"""The record schema: the names under which a run is stored in MLflow and published (docs/records.md).

Every tag, metric root and artifact name the runner writes and the sweep, the console summary, the CLI and the
leaderboard read is spelled once, here; so are a cell's identity (`cell_identity`, `cell_hash`, `sweep_id`), the
rule that tells a task's metrics from the rest (`task_metric_names`) and the number and table formatting of every
printed or rendered value. This module imports nothing of the runner, the sweep or MLflow: everything else imports
it, so the record has one definition and the core no import circle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

# --- tags: what a run is ------------------------------------------------------------------------------------------
METHOD = "bench.method"
METHOD_FAMILY = "bench.method_family"
METHOD_PAPER = "bench.method_paper"
METHOD_SUMMARY = "bench.method_summary"  # first paragraph of the method module's docstring
METHOD_OVERRIDES = "bench.method_overrides"  # JSON: the method's settings that differ from its shipped YAML
TASK = "bench.task"
TASK_KEY = "bench.task_key"  # content key of the task config + protocol version (finds a reusable baseline)
TASK_FAILURES = "bench.task_failures"  # JSON {part: error} of a multi-task run's parts that could not run
RECOVER = "bench.recover"
STAGES = "bench.stages"  # "sparsegpt > rtn > recover=rora"
MODEL = "bench.model"
MODEL_WEIGHTS_SHA256 = "bench.model_weights_sha256"  # the base weights as loaded
HARDWARE = "bench.hardware"
HARDWARE_STATUS = "bench.hardware_status"  # "unsupported" when the backend cannot run the packed model
HARDWARE_UNSUPPORTED = "bench.hardware_unsupported"  # the backend's reason
CALIB = "bench.calib"
CALIB_SET = "bench.calib_set"  # what the calibration windows are (only when calibration was used)
CALIB_SHA256 = "bench.calib_sha256"  # their content hash (only when calibration was used)
BUDGET = "bench.budget"
SEED = "bench.seed"
THREADS = "bench.threads"
PRECISION = "bench.precision"  # fp32 | bf16 compute of evaluation and timing (of every forward in older runs)
COMPRESS_PRECISION = "bench.compress_precision"  # fp32 | bf16 compute of calibration and training forwards
CONFIG_HASH = "bench.config_hash"  # cell_hash(): the cell's identity
SWEEP = "bench.sweep"  # the sweep id, "-" for a single run
CELL = "bench.cell"  # a failed sweep cell's overrides, on the FAILED run recorded for it
COMMAND = "bench.command"  # the `python -m bench ...` line that reproduces the cell (bench/reproduce.py)
COMMAND_CHECK = "bench.command_check"  # "reproduces", or what composing the command gave instead
GIT_COMMIT = "bench.git_commit"  # "<sha>" or "<sha>-dirty" or "unknown"
EXECUTION = "bench.execution"  # how torch ran the packed model: dense | fake-quant | ...
DEPLOYED_EXECUTION = "bench.deployed_execution"  # what a backend with real kernels ran instead
PRIMARY_METRIC = "bench.primary_metric"  # the task's headline metric (ranking, plots)
CACHE = "bench.cache"  # hit | miss of the compressed-artifact cache
ARTIFACT_KEY = "bench.artifact_key"
CACHE_DISCARDED = "bench.cache_discarded"  # why a corrupt cached artifact was rebuilt
PID = "bench.pid"
HOST = "bench.host"
ERROR = "error"  # a FAILED or KILLED run's error line
RECORD_ID = "bench.record_id"  # set on runs imported from a published record (bench/published.py)
RECORD_FILE = "bench.record_file"  # that record's file name

# tag prefixes: one tag per key
VERSION_PREFIX = "version."  # package versions
MACHINE_PREFIX = "machine."  # host, cpu, cores, memory, limits, platform, python
PRECISION_PREFIX = "precision."  # the kernels a precision ran on (e.g. oneDNN's bf16 matmul ISA)
MODEL_PREFIX = "model."  # scalar facts of the model as loaded
HARDWARE_PREFIX = "hardware."  # the backend's measurement tags: threads, energy_source, execution, ...
ENERGY_SOURCE = "hardware.energy_source"  # rapl | nvml | sim:<tool> | model:<table>


def direction_tag(metric: str) -> str:
    """The tag in which a task declares its metric and whether lower or higher is better."""
    return f"metric.{metric}.direction"


# --- metrics: roots of what is not a task's quality measurement ---------------------------------------------------
STORAGE = "storage"  # bits per weight with every overhead, bytes written
LATENCY = "latency"
THROUGHPUT = "throughput"
MEMORY = "memory"
ENERGY = "energy"  # energy.<quantity>.<source>
TIME = "time"  # wall seconds of the run's phases
METHOD_INFO = "method"  # a method's own scalar facts (method.<key>)
COST = "cost"  # MACs and parameters a task counts (architecture, not quality)
TRAIN = "train"  # the training record of a method that trains
NON_TASK_ROOTS = frozenset({STORAGE, LATENCY, THROUGHPUT, MEMORY, ENERGY, TIME, METHOD_INFO, COST, TRAIN})

BITS_PER_WEIGHT = "storage.bits_per_weight.block_linears"
ARTIFACT_BYTES = "storage.artifact_bytes"
DECODE_TOKENS_PER_S = "throughput.decode_tokens_per_s"
DECODE_P50_S = "latency.decode_per_token.p50_s"
STDERR_SUFFIX = ".stderr"
CI95_LOW_SUFFIX, CI95_HIGH_SUFFIX = ".ci95_low", ".ci95_high"  # a metric's 95% interval (e.g. bootstrap)
DEPLOYED_SUFFIX = ".deployed"  # <metric>.deployed: the metric re-measured on a backend's real kernels

# the training record (a method that trains, bench/training.py): metrics and tags
TRAIN_STEPS = "train.steps"
TRAIN_TOKENS_SEEN = "train.tokens_seen"
TRAIN_EPOCHS = "train.epochs"
TRAIN_SECONDS = "train.seconds"
TRAIN_LOSS_FIRST = "train.loss_first"
TRAIN_LOSS_LAST = "train.loss_last"
TRAIN_VAL_LOSS_FIRST = "train.val_loss_first"
TRAIN_VAL_LOSS_LAST = "train.val_loss_last"
TRAIN_METRICS = (TRAIN_STEPS, TRAIN_TOKENS_SEEN, TRAIN_EPOCHS, TRAIN_SECONDS, TRAIN_LOSS_FIRST, TRAIN_LOSS_LAST,
                 TRAIN_VAL_LOSS_FIRST, TRAIN_VAL_LOSS_LAST)
TRAIN_CONVERGED = "train.converged"  # "true" | "false"
TRAIN_CRITERION = "train.criterion"  # the convergence criterion, one line
TRAIN_VERDICT = "train.verdict"  # what the criterion found, in words

# --- artifacts ------------------------------------------------------------------------------------------------------
TASK_METRICS_FILE = "task_metrics.json"  # [{name, value, direction, unit, stderr, notes, per_sample_name, per_sample}]
TASK_METRICS_DEPLOYED_FILE = "task_metrics_deployed.json"  # the same, re-measured on a backend's real kernels
CONFIG_FILE = "config.yaml"  # the cell's resolved config
PER_LAYER_FILE = "per_layer.json"
TRAIN_CURVE_FILE = "train_curve.json"
TRAIN_CURVE_PLOT = "train_curve.png"


def is_task_metric(name: str, tags: dict[str, str]) -> bool:
    """A task metric is one its task declared: the run carries its direction tag (`direction_tag`). Storage,
    latency, energy, memory, timing, training and method facts are never declared; a task's own cost counts
    (`cost.*`) are, and show as columns beside its quality metrics."""
    return direction_tag(name) in tags


def task_metric_names(tags: dict[str, str]) -> list[str]:
    """Every task metric of a run, its headline first (the `PRIMARY_METRIC` tag; else the first of the others in
    name order, e.g. for runs recorded before that tag)."""
    names = sorted(k[len("metric."):-len(".direction")] for k in tags
                   if k.startswith("metric.") and k.endswith(".direction"))
    head = primary_metric(tags, names)
    return ([head] if head else []) + [n for n in names if n != head]


def primary_metric(tags: dict[str, str], names: list[str] | None = None) -> str | None:
    names = names if names is not None else task_metric_names(tags)
    if not names:
        return None
    tagged = tags.get(PRIMARY_METRIC)
    if tagged in names:
        return tagged
    averaged = [n for n in names if "_mean_of_" in n]  # runs recorded before the primary-metric tag
    return averaged[0] if averaged else sorted(names)[0]


def method_overrides(tags: dict[str, str]) -> dict:
    """A run's `METHOD_OVERRIDES` as {key: value}; {} for runs recorded before the tag existed."""
    return json.loads(tags.get(METHOD_OVERRIDES) or "{}")


# --- cell identity ------------------------------------------------------------------------------------------------
SWEEP_ENV = "BENCH_SWEEP_ID"


def sweep_id() -> str:
    """The id of the sweep this process runs a cell of, "" outside a sweep."""
    return os.environ.get(SWEEP_ENV, "")


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_identity(cfg) -> dict:
    """What defines a cell's result: everything but where files live and whether a baseline is shown."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    c.pop("paths", None)
    c.pop("compare_baseline", None)
    c.pop("hydra", None)
    if (c.get("recover") or {}).get("name") == "none":  # no recovery stage: its unused knobs do not split cells
        c["recover"] = {"name": "none"}
    if c.get("compress_precision") == c.get("precision"):  # one precision throughout: the cell as recorded
        c.pop("compress_precision", None)                # before the key existed keeps its hash
    return c


def cell_hash(cfg) -> str:
    return config_hash(cell_identity(cfg))


def record_id(config_hash_: str, git_commit: str, start_time_ms: int) -> str:
    """A published record's id: the cell, the code it ran and when it started; the same in every store the record
    is imported into (an import keeps the start time), so exporting or importing it again finds it."""
    return hashlib.sha256(f"{config_hash_}|{git_commit}|{int(start_time_ms)}".encode()).hexdigest()[:16]


@dataclass
class CellResult:
    """One finished cell as the runner returns it: its MLflow run id, metrics and tags."""

    run_id: str
    method: str
    metrics: dict[str, float]
    tags: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    reused: bool = False


# --- formatting -----------------------------------------------------------------------------------------------------
def fmt(v, digits: int = 4) -> str:
    """A number as printed and rendered everywhere: `digits` significant digits, "-" for no number."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    return f"{v:,.{digits}g}" if abs(v) >= 1e5 else f"{v:.{digits}g}"


def table(header: list[str], body: list[list[str]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])
