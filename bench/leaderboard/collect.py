"""Read the MLflow store into leaderboard pages. Reads only; never re-runs anything.

A page is one (model, task, headline metric, compute precision): the metric name carries the protocol and any
`.firstN` limit, so a subset number never shares a table with a full one, and a bf16 number never shares one with
an fp32 number (runs recorded before the precision axis existed computed in fp32). A row is one method configuration
(method params, plus calibration set and budget when the method used them); runs that differ only in
seed are aggregated (mean +/- std), runs on several hardware backends fill that row's per-backend columns.
Statistics (bootstrap CI, paired test against the best row) come from the per-sample values each run
stored in its `task_metrics.json` artifact.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.resources
import json
import math
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from bench import stats, tracking

ALPHA = 0.05
BACKEND_ORDER = ("cpu",)  # the backend whose run supplies a row's accuracy; others follow alphabetically
SKIP_METHOD_PARAMS = {"_target_", "name", "seed"}  # seeds are aggregated within a row, not rows


@dataclass
class BackendCell:
    backend: str
    status: str  # measured | unsupported
    reason: str = ""
    prefill_ms: float | None = None
    prefill_tokens: int | None = None
    decode_tokens_per_s: float | None = None
    energy_j_per_token: float | None = None
    energy_source: str = ""
    execution: str = ""
    threads: str = ""
    run_id: str = ""
    deployed_value: float | None = None  # the page's headline metric re-measured on what this backend ran
    deployed_execution: str = ""  # e.g. ort-matmulnbits-int4-b128-acc4, litert-xnnpack-fp32


@dataclass
class Row:
    method: str
    family: str
    method_params: dict
    calib: str
    budget: str
    paper: str = ""
    summary: str = ""
    label: str = ""
    runs: list = field(default_factory=list)  # primary-backend runs, one per seed (newest wins)
    metrics: dict[str, float] = field(default_factory=dict)  # seed means of every task metric
    metric_std: dict[str, float] = field(default_factory=dict)
    metric_stderr: dict[str, float] = field(default_factory=dict)
    value: float = math.nan  # headline metric (seed mean)
    std: float = 0.0
    ci: tuple[float, float] | None = None
    per_sample: np.ndarray | None = None
    p_vs_best: float | None = None  # Holm-adjusted paired test against the best row
    is_best: bool = False
    rel_to_baseline: float | None = None
    bits_per_weight: float | None = None
    artifact_bytes: float | None = None
    backends: dict[str, BackendCell] = field(default_factory=dict)
    date: str = ""
    git_commit: str = ""
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def seeds(self) -> list[str]:
        return [r.data.tags.get("bench.seed", "?") for r in self.runs]

    @property
    def run_ids(self) -> list[str]:
        return [r.info.run_id for r in self.runs]

    @property
    def indistinguishable(self) -> bool:
        return self.p_vs_best is not None and self.p_vs_best >= ALPHA


@dataclass
class Page:
    model: str
    task: str
    metric: str
    direction: str
    statistic: str  # what one per-sample value is, e.g. window_mean_nll
    metrics: list[str]  # every task metric column on this page, headline first
    rows: list[Row]
    backends: list[str]
    failed: list[dict]
    precision: str = "fp32"  # how every forward of the page's runs was computed (bench.precision)

    @property
    def slug(self) -> str:
        raw = f"{self.model}__{self.task}__{self.metric}__{self.precision}"
        return "".join(c if c.isalnum() or c in "._-" else "_" for c in raw)


def _direction(run, name: str) -> str | None:
    return run.data.tags.get(f"metric.{name}.direction")


def _task_metrics(run) -> list[str]:
    return [k[len("metric."):-len(".direction")] for k in run.data.tags
            if k.startswith("metric.") and k.endswith(".direction")]


def _headline(run) -> str | None:
    names = _task_metrics(run)
    if not names:
        return None
    tagged = run.data.tags.get("bench.primary_metric")
    if tagged in names:
        return tagged
    averaged = [n for n in names if "_mean_of_" in n]  # runs recorded before the primary-metric tag
    return averaged[0] if averaged else sorted(names)[0]


def _row_key(run) -> tuple[str, dict, str, str]:
    params = run.data.params
    method_params = {k[len("method."):]: v for k, v in params.items()
                     if k.startswith("method.") and k[len("method."):] not in SKIP_METHOD_PARAMS}
    if params.get("recover.name", "none") != "none":  # a recovery stage makes it another row (label shows it)
        method_params.update({k: v for k, v in params.items() if k.startswith("recover.") and k != "recover.seed"})
    used_calib = "bench.calib_sha256" in run.data.tags  # calibration and budget matter only if used
    calib = run.data.tags.get("bench.calib", "-") if used_calib else "-"
    budget = run.data.tags.get("bench.budget", "-") if used_calib else "-"
    key = json.dumps([run.data.tags.get("bench.method"), method_params, calib, budget], sort_keys=True)
    return key, method_params, calib, budget


def load_runs(results_dir: str | Path):
    tracking.setup(results_dir)
    client = MlflowClient()
    exp = tracking.retry(client.get_experiment_by_name, tracking.EXPERIMENT)
    if exp is None:
        return client, []
    runs, token = [], None
    while True:
        page = tracking.retry(client.search_runs, [exp.experiment_id], max_results=5000, page_token=token,
                              order_by=["attributes.start_time DESC"])
        runs.extend(page)
        token = page.token
        if not token:
            return client, runs


def _artifact_json(client, run, name: str):
    """A run's JSON artifact: read in place from a local store, downloaded from a remote one."""
    uri = run.info.artifact_uri
    with contextlib.suppress(OSError, ValueError):
        if uri.startswith("file:"):
            return json.loads((Path(unquote(urlparse(uri).path)) / name).read_text())
        with tempfile.TemporaryDirectory() as d:
            return json.loads(Path(client.download_artifacts(run.info.run_id, name, d)).read_text())
    return None


def _backend_cell(run, head: str) -> BackendCell:
    t, m = run.data.tags, run.data.metrics
    cell = BackendCell(t.get("bench.hardware", "?"), "measured", run_id=run.info.run_id,
                       execution=t.get("bench.execution", ""), threads=t.get("hardware.threads", ""),
                       deployed_value=m.get(f"{head}.deployed"),
                       deployed_execution=t.get("bench.deployed_execution", ""))
    if t.get("bench.hardware_status") == "unsupported":
        cell.status, cell.reason = "unsupported", t.get("bench.hardware_unsupported", "")
        return cell
    for k, v in m.items():
        if k.startswith("latency.prefill_") and k.endswith(".p50_s"):
            cell.prefill_ms, cell.prefill_tokens = v * 1e3, int(k.split(".")[1].split("_")[1])
        elif k.startswith("energy.prefill_j_per_token."):
            cell.energy_j_per_token = v
            cell.energy_source = t.get("hardware.energy_source", k.rsplit(".", 1)[-1])
    cell.decode_tokens_per_s = m.get("throughput.decode_tokens_per_s")
    return cell


@functools.cache
def _shipped_defaults(method: str) -> dict[str, str]:
    """The settings the method's shipped YAML gives it, as strings like the stored params; {} for a name without
    one. Interpolations (`seed: ${seed}`) are left out: their stored values are resolved."""
    if not re.fullmatch(r"\w+", method):
        return {}
    path = importlib.resources.files("bench.configs").joinpath("method", f"{method}.yaml")
    if not path.is_file():
        return {}
    flat = tracking.flatten(OmegaConf.to_container(OmegaConf.create(path.read_text()), resolve=False))
    return {k: v for k, v in flat.items() if not v.startswith("${")}


def _label_rows(rows: list[Row]) -> None:
    """A row's label is its method name plus the settings a reader needs to tell what was run: those that differ
    from the method's shipped defaults, those that differ between its method's rows, and those of its own keys
    that differ across the page (so a lone `gptq (bits=3, group_size=32)` is not read as the default setting, nor
    as the same setting as `awq (bits=4, group_size=128)`)."""
    across_page = {k for r in rows for k in r.method_params
                   if len({x.method_params[k] for x in rows if k in x.method_params}) > 1}
    by_method = defaultdict(list)
    for r in rows:
        by_method[r.method].append(r)
    for method, same in by_method.items():
        defaults = _shipped_defaults(method)
        within_method = {k for r in same for k in r.method_params
                         if len({x.method_params.get(k) for x in same}) > 1}
        for r in same:
            changed = {k for k, v in r.method_params.items() if k in defaults and defaults[k] != v}
            shown = changed | within_method | (across_page & set(r.method_params))
            extra = [f"{k}={r.method_params.get(k)}" for k in sorted(shown)]
            if len({(x.calib, x.budget) for x in same}) > 1:
                extra += [f"calib={r.calib}", f"budget={r.budget}"]
            r.label = r.method + (f" ({', '.join(extra)})" if extra else "")


def build_pages(results_dir: str | Path) -> tuple[list[Page], list[dict]]:
    """The pages, and the failed/killed runs of (model, task) pairs that have no finished run at all."""
    client, runs = load_runs(results_dir)
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    failed: dict[tuple, list] = defaultdict(list)
    for run in runs:  # newest first
        t = run.data.tags
        head = _headline(run)
        if run.info.status != "FINISHED":
            if run.info.status in ("FAILED", "KILLED"):
                failed[(t.get("bench.model"), t.get("bench.task"))].append(
                    {"method": t.get("bench.method", "?"), "status": run.info.status, "run_id": run.info.run_id,
                     "error": t.get("error", ""), "hardware": t.get("bench.hardware", "?"),
                     "date": _date(run)})
            continue
        if head is None:
            continue
        groups[(t.get("bench.model"), t.get("bench.task"), head, run_precision(run))][_row_key(run)[0]].append(run)
    pages = []
    for (model, task, head, precision), rows_runs in groups.items():
        rows = [_make_row(client, rr, head) for rr in rows_runs.values()]
        first = next(iter(rows_runs.values()))[0]
        names = [head] + sorted(set().union(*(_task_metrics(r) for rr in rows_runs.values() for r in rr)) - {head})
        direction = _direction(first, head) or "lower"
        statistic = next((r.notes.get("per_sample_name") for r in rows if r.notes.get("per_sample_name")), "")
        backends = sorted({b for r in rows for b in r.backends}, key=_backend_rank)
        page = Page(model, task, head, direction, statistic, names, rows, backends,
                    list(failed.get((model, task), [])), precision)
        _rank(page)
        _label_rows(rows)
        pages.append(page)
    pages.sort(key=lambda p: (p.model, p.task, p.metric, p.precision != "fp32", p.precision))
    shown = {(p.model, p.task) for p in pages}
    orphans = [dict(f, model=m, task=t) for (m, t), fs in failed.items() if (m, t) not in shown for f in fs]
    return pages, orphans


def run_precision(run) -> str:
    """A run's compute precision; runs recorded before the axis existed computed every forward in fp32."""
    return run.data.tags.get("bench.precision", "fp32")


def _backend_rank(name: str) -> tuple[int, str]:
    return (BACKEND_ORDER.index(name) if name in BACKEND_ORDER else len(BACKEND_ORDER), name)


def _date(run) -> str:
    return datetime.datetime.fromtimestamp(run.info.start_time / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def _make_row(client, runs: list, head: str) -> Row:
    _, method_params, calib, budget = _row_key(runs[0])
    t0 = runs[0].data.tags
    row = Row(t0.get("bench.method", "?"), t0.get("bench.method_family", ""), method_params, calib, budget,
              paper=t0.get("bench.method_paper", ""), summary=t0.get("bench.method_summary", ""))
    by_backend = defaultdict(list)
    for r in runs:
        by_backend[r.data.tags.get("bench.hardware", "?")].append(r)
    primary = sorted(by_backend, key=_backend_rank)[0]
    per_seed = {}
    for r in by_backend[primary]:  # newest first: the first run of each seed wins
        per_seed.setdefault(r.data.tags.get("bench.seed", "?"), r)
    row.runs = list(per_seed.values())
    for b, rs in by_backend.items():
        row.backends[b] = _backend_cell(rs[0], head)
    metric_names = set().union(*(_task_metrics(r) for r in row.runs))
    for name in metric_names:
        vals = [r.data.metrics[name] for r in row.runs if name in r.data.metrics]
        if vals:
            row.metrics[name], row.metric_std[name] = stats.mean_std(vals)
            se = [r.data.metrics.get(f"{name}.stderr") for r in row.runs]
            if len(vals) == 1 and se[0] is not None:
                row.metric_stderr[name] = se[0]
    row.value, row.std = row.metrics.get(head, math.nan), row.metric_std.get(head, 0.0)
    latest = row.runs[0]
    row.bits_per_weight = latest.data.metrics.get("storage.bits_per_weight.block_linears")
    row.artifact_bytes = latest.data.metrics.get("storage.artifact_bytes")
    row.date, row.git_commit = _date(latest), latest.data.tags.get("bench.git_commit", "")
    samples = []
    for r in row.runs:
        for m in _artifact_json(client, r, "task_metrics.json") or []:
            if m.get("notes", {}).get("data"):
                row.notes[m["name"]] = m["notes"]["data"]
            if m["name"] == head and m.get("per_sample"):
                samples.append(m["per_sample"])
                row.notes["per_sample_name"] = m.get("per_sample_name", "")
    if samples and len({len(s) for s in samples}) == 1:
        row.per_sample = np.mean(np.asarray(samples, dtype=np.float64), axis=0)  # seed mean per sample
    return row


def _rank(page: Page) -> None:
    """Best row, bootstrap CIs, paired tests of every row against the best (Holm-adjusted), baseline ratio."""
    finite = [r for r in page.rows if math.isfinite(r.value)]
    if not finite:
        return
    better = min if page.direction == "lower" else max
    best = better(finite, key=lambda r: r.value)
    best.is_best = True
    statistic = stats.STATISTICS.get(page.statistic)
    for r in page.rows:
        if statistic is not None and r.per_sample is not None and r.per_sample.size >= 2:
            r.ci = stats.bootstrap_ci(r.per_sample, statistic)
    others = [r for r in finite if r is not best and r.per_sample is not None and best.per_sample is not None
              and r.per_sample.shape == best.per_sample.shape and statistic is not None]
    if others:
        raw = [stats.paired_permutation_test(r.per_sample, best.per_sample) for r in others]
        for r, p in zip(others, stats.holm(raw)):
            r.p_vs_best = p
    base = next((r for r in page.rows if r.method == "none"), None)
    if base is not None and math.isfinite(base.value) and base.value != 0:
        for r in page.rows:
            r.rel_to_baseline = r.value / base.value
    page.rows.sort(key=lambda r: (not math.isfinite(r.value), r.value if page.direction == "lower" else -r.value))
