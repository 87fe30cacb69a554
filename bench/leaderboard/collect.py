"""Read the MLflow store and the published records into leaderboard pages. Reads only; never re-runs anything.

Runs come from two places, read the same way (`StoredRun`): the local MLflow store, and the published records
(`leaderboard/records/*.json`, bench/published.py), read directly. A record that is also in the store (exported from
it, or imported into it) is one run, shown as published. Every row says which it is.

A page is one (model, task, headline metric, compute precision): the metric name carries the protocol and any
`.firstN` limit, so a subset number never shares a table with a full one, and a bf16 number never shares one with
an fp32 number (runs recorded before the precision axis existed computed in fp32). A row is one method configuration
(method params, plus calibration set and budget settings when the method used them); runs that differ only in
seed are aggregated (mean +/- std), runs on several hardware backends fill that row's per-backend columns.
Statistics (bootstrap CI, paired test against the best row) come from the per-sample values each run
stored in its `task_metrics.json` artifact (a record carries them). A method page lists every run of one method
over time, so the same config at different git commits shows a regression.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench import published, record, stats, tracking

ALPHA = 0.05
BACKEND_ORDER = ("cpu",)  # the backend whose run supplies a row's accuracy; others follow alphabetically
SKIP_METHOD_PARAMS = {"_target_", "name", "seed"}  # seeds are aggregated within a row, not rows
SKIP_BUDGET_PARAMS = {"_target_", "name", "description"}
LOCAL, PUBLISHED = "local", "published"


@dataclass
class StoredRun:
    """One run as the leaderboard reads it, from the local MLflow store or from a published record."""

    run_id: str
    status: str
    start_time: int  # ms since the epoch
    tags: dict[str, str]
    metrics: dict[str, float]
    params: dict[str, str]  # the flattened config, as MLflow stores params
    source: str = LOCAL  # LOCAL | PUBLISHED
    record_file: str = ""  # the published record's file name
    load_task_metrics: Callable[[], list | None] = field(default=lambda: None, repr=False)

    @property
    def record_id(self) -> str:
        return self.tags.get(record.RECORD_ID) or record.record_id(
            self.tags.get(record.CONFIG_HASH, ""), self.tags.get(record.GIT_COMMIT, ""), self.start_time)

    @property
    def date(self) -> str:
        return datetime.datetime.fromtimestamp(self.start_time / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M")

    @property
    def command(self) -> str:
        return self.tags.get(record.COMMAND, "")

    @property
    def seed(self) -> str:
        return self.tags.get(record.SEED, "?")

    @property
    def git_commit(self) -> str:
        return self.tags.get(record.GIT_COMMIT, "")


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
    budget_params: dict = field(default_factory=dict)  # the budget's settings, when the method used one
    compress_precision: str = "-"  # what its calibration/training forwards computed in, when it had any
    paper: str = ""
    summary: str = ""
    label: str = ""
    config_label: str = ""  # the label without budget settings: one line of a quality-vs-training-budget plot
    runs: list[StoredRun] = field(default_factory=list)  # primary-backend runs, one per seed (newest wins)
    metrics: dict[str, float] = field(default_factory=dict)  # seed means of every task metric
    metric_std: dict[str, float] = field(default_factory=dict)
    metric_stderr: dict[str, float] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)  # seed means of the training record (train.*)
    converged: str = ""  # train.converged of the newest run: "true" | "false" | "" (no training record)
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
    command: str = ""  # the newest run's reproducing `python -m bench ...` line
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def seeds(self) -> list[str]:
        return [r.seed for r in self.runs]

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs]

    @property
    def source(self) -> str:
        """published (every run of the row is a published record), local, or mixed."""
        kinds = {r.source for r in self.runs}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def record_files(self) -> list[str]:
        return [r.record_file for r in self.runs if r.record_file]

    @property
    def indistinguishable(self) -> bool:
        return self.p_vs_best is not None and self.p_vs_best >= ALPHA

    @property
    def line_key(self) -> str:
        """The row's config without its budget: the rows of one line in a quality-vs-training-budget plot."""
        return json.dumps([self.method, self.method_params, self.calib], sort_keys=True)


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
        return slug(self.model, self.task, self.metric, self.precision)


def slug(*parts: str) -> str:
    """A file name for a page: the parts joined by `__`, anything but letters, digits and `._-` replaced."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in "__".join(map(str, parts)))


@dataclass
class HistoryEntry:
    """One run of a method page: the same config over time, so a change between git commits shows."""

    run: StoredRun
    value: float
    bits_per_weight: float | None
    change: float | None = None  # value minus the previous entry's, when that ran at another git commit
    worse: bool = False


@dataclass
class MethodPage:
    method: str
    family: str
    paper: str
    summary: str
    configs: list[dict]  # {model, task, metric, precision, direction, label, hardware, entries: [HistoryEntry]}

    @property
    def slug(self) -> str:
        return slug("method", self.method)


# --- reading ----------------------------------------------------------------------------------------------------------
def store_exists(results_dir: str | Path) -> bool:
    """A store to read: MLFLOW_TRACKING_URI, or results/mlflow.db. Reading never creates one."""
    import os

    return bool(os.environ.get("MLFLOW_TRACKING_URI")) or (Path(results_dir) / "mlflow.db").is_file()


def load_local(results_dir: str | Path) -> list[StoredRun]:
    if not store_exists(results_dir):
        return []
    from mlflow.tracking import MlflowClient

    tracking.setup(results_dir)
    client = MlflowClient()
    exp = tracking.retry(client.get_experiment_by_name, tracking.EXPERIMENT)
    if exp is None:
        return []
    runs, token = [], None
    while True:
        page = tracking.retry(client.search_runs, [exp.experiment_id], max_results=5000, page_token=token,
                              order_by=["attributes.start_time DESC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [StoredRun(r.info.run_id, r.info.status, int(r.info.start_time), dict(r.data.tags), dict(r.data.metrics),
                      dict(r.data.params), record_file=r.data.tags.get(record.RECORD_FILE, ""),
                      source=PUBLISHED if record.RECORD_ID in r.data.tags else LOCAL,
                      load_task_metrics=lambda r=r: _artifact_json(client, r, record.TASK_METRICS_FILE))
            for r in runs]


def _artifact_json(client, run, name: str):
    text = tracking.artifact_text(client, run, name)
    with contextlib.suppress(ValueError):
        return json.loads(text) if text is not None else None
    return None


def load_published(records_dir: str | Path | None) -> list[StoredRun]:
    """The published records under `records_dir` (each validated; a broken one is a RecordError)."""
    if records_dir is None or not Path(records_dir).is_dir():
        return []
    out = []
    for path, rec in published.read_all([records_dir]):
        out.append(StoredRun(rec["run"]["source_run_id"], rec["run"]["status"], rec["run"]["start_time"],
                             dict(rec["tags"]), dict(rec["metrics"]), tracking.flatten(rec["config"]), PUBLISHED,
                             path.name, lambda rec=rec: published.decoded(rec["task_metrics"])))
    return out


def load_runs(results_dir: str | Path, records_dir: str | Path | None = None) -> list[StoredRun]:
    """The local store's runs and the published records, newest first; a record that is also in the store (exported
    from it or imported into it) is one run, marked published."""
    local = load_local(results_dir)
    records = {r.record_id: r for r in load_published(records_dir)}
    for run in local:
        rec = records.pop(run.record_id, None)
        if rec is not None and run.status == "FINISHED":
            run.source, run.record_file = PUBLISHED, rec.record_file
    return sorted(local + list(records.values()), key=lambda r: -r.start_time)


# --- pages ------------------------------------------------------------------------------------------------------------
def _backend_cell(run: StoredRun, head: str) -> BackendCell:
    t, m = run.tags, run.metrics
    cell = BackendCell(t.get(record.HARDWARE, "?"), "measured", run_id=run.run_id,
                       execution=t.get(record.EXECUTION, ""), threads=t.get(f"{record.HARDWARE_PREFIX}threads", ""),
                       deployed_value=m.get(f"{head}{record.DEPLOYED_SUFFIX}"),
                       deployed_execution=t.get(record.DEPLOYED_EXECUTION, ""))
    if t.get(record.HARDWARE_STATUS) == "unsupported":
        cell.status, cell.reason = "unsupported", t.get(record.HARDWARE_UNSUPPORTED, "")
        return cell
    for k, v in m.items():
        if k.startswith(f"{record.LATENCY}.prefill_") and k.endswith(".p50_s"):
            cell.prefill_ms, cell.prefill_tokens = v * 1e3, int(k.split(".")[1].split("_")[1])
        elif k.startswith(f"{record.ENERGY}.prefill_j_per_token."):
            cell.energy_j_per_token = v
            cell.energy_source = t.get(record.ENERGY_SOURCE, k.rsplit(".", 1)[-1])
    cell.decode_tokens_per_s = m.get(record.DECODE_TOKENS_PER_S)
    return cell


def _row_key(run: StoredRun) -> tuple[str, dict, str, str, dict, str]:
    params = run.params
    method_params = {k[len("method."):]: v for k, v in params.items()
                     if k.startswith("method.") and k[len("method."):] not in SKIP_METHOD_PARAMS}
    if params.get("recover.name", "none") != "none":  # a recovery stage makes it another row (label shows it)
        method_params.update({k: v for k, v in params.items() if k.startswith("recover.") and k != "recover.seed"})
    used_calib = record.CALIB_SHA256 in run.tags  # calibration and budget matter only if used
    calib = run.tags.get(record.CALIB, "-") if used_calib else "-"
    budget = run.tags.get(record.BUDGET, "-") if used_calib else "-"
    budget_params = {k[len("budget."):]: v for k, v in params.items()
                     if used_calib and k.startswith("budget.") and k[len("budget."):] not in SKIP_BUDGET_PARAMS}
    # the precision of calibration and training changes the stored model (runs before the key: the run's precision)
    compress = run.tags.get(record.COMPRESS_PRECISION, run_precision(run)) if used_calib else "-"
    key = [run.tags.get(record.METHOD), method_params, calib, budget, budget_params]
    key += [compress] if compress not in ("-", run_precision(run)) else []  # older row keys stay as they were
    return json.dumps(key, sort_keys=True), method_params, calib, budget, budget_params, compress


def _label_rows(rows: list[Row]) -> None:
    """A row's label is its method name plus the settings a reader needs to tell what was run: those that differ
    from the method's shipped defaults (the run's `bench.method_overrides`), those that differ between its method's
    rows, and those of its own keys that differ across the page (so a lone `gptq (bits=3, group_size=32)` is not
    read as the default setting, nor as the same setting as `awq (bits=4, group_size=128)`); and, where its
    method's rows differ in calibration or budget, those settings."""
    across_page = {k for r in rows for k in r.method_params
                   if len({x.method_params[k] for x in rows if k in x.method_params}) > 1}
    by_method = defaultdict(list)
    for r in rows:
        by_method[r.method].append(r)
    for method, same in by_method.items():
        within_method = {k for r in same for k in r.method_params
                         if len({x.method_params.get(k) for x in same}) > 1}
        budget_keys = {k for r in same for k in r.budget_params
                       if len({x.budget_params.get(k) for x in same}) > 1}
        for r in same:
            changed = {k for k in record.method_overrides(r.runs[0].tags) if k in r.method_params}
            shown = changed | within_method | (across_page & set(r.method_params))
            extra = [f"{k}={r.method_params.get(k)}" for k in sorted(shown)]
            if len({x.calib for x in same}) > 1:
                extra.append(f"calib={r.calib}")
            if r.compress_precision not in ("-", run_precision(r.runs[0])):  # not the page's precision: said
                extra.append(f"compress_precision={r.compress_precision}")
            r.config_label = r.method + (f" ({', '.join(extra)})" if extra else "")
            if len({x.budget for x in same}) > 1:
                extra.append(f"budget={r.budget}")
            extra += [f"budget.{k}={r.budget_params.get(k)}" for k in sorted(budget_keys)]
            r.label = r.method + (f" ({', '.join(extra)})" if extra else "")


def _page_key(run: StoredRun) -> tuple[str, str, str, str] | None:
    head = record.primary_metric(run.tags)
    if head is None:
        return None
    return run.tags.get(record.MODEL), run.tags.get(record.TASK), head, run_precision(run)


def build_pages(results_dir: str | Path, records_dir: str | Path | None = None,
                runs: list[StoredRun] | None = None) -> tuple[list[Page], list[dict]]:
    """The pages, and the failed/killed runs of (model, task) pairs that have no finished run at all."""
    runs = load_runs(results_dir, records_dir) if runs is None else runs
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    failed: dict[tuple, list] = defaultdict(list)
    for run in runs:  # newest first
        t = run.tags
        if run.status != "FINISHED":
            if run.status in ("FAILED", "KILLED"):
                failed[(t.get(record.MODEL), t.get(record.TASK))].append(
                    {"method": t.get(record.METHOD, "?"), "status": run.status, "run_id": run.run_id,
                     "error": t.get(record.ERROR, ""), "hardware": t.get(record.HARDWARE, "?"), "date": run.date})
            continue
        key = _page_key(run)
        if key is not None:
            groups[key][_row_key(run)[0]].append(run)
    pages = []
    for (model, task, head, precision), rows_runs in groups.items():
        rows = [_make_row(rr, head) for rr in rows_runs.values()]
        first = next(iter(rows_runs.values()))[0]
        names = [head] + sorted({n for rr in rows_runs.values() for r in rr for n in record.task_metric_names(r.tags)}
                                - {head})
        direction = first.tags.get(record.direction_tag(head)) or "lower"
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


def build_method_pages(runs: list[StoredRun], pages: list[Page]) -> list[MethodPage]:
    """One page per method: every FINISHED run of each of its configs (page rows), oldest first, on every backend;
    each entry's change against the previous one when that ran at another git commit."""
    labels = {(p.model, p.task, p.metric, p.precision, _row_key(run)[0]): (r.label, p.direction)
              for p in pages for r in p.rows for run in r.runs}
    by_method: dict[str, dict[tuple, list[StoredRun]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        key = _page_key(run)
        if run.status == "FINISHED" and key is not None:
            by_method[run.tags.get(record.METHOD, "?")][(*key, _row_key(run)[0],
                                                         run.tags.get(record.HARDWARE, "?"))].append(run)
    out = []
    for method, configs in sorted(by_method.items()):
        entries_of = []
        for (model, task, head, precision, row_key, hardware), rs in sorted(configs.items()):
            label, direction = labels.get((model, task, head, precision, row_key), (None, "lower"))
            entries, previous = [], None
            for run in sorted(rs, key=lambda r: r.start_time):
                e = HistoryEntry(run, run.metrics.get(head, math.nan), run.metrics.get(record.BITS_PER_WEIGHT))
                if previous is not None and previous.run.git_commit != run.git_commit:
                    e.change = e.value - previous.value
                    e.worse = e.change > 0 if direction == "lower" else e.change < 0
                entries.append(e)
                previous = e
            entries_of.append({"page": slug(model, task, head, precision) if label is not None else "",
                               "model": model, "task": task, "metric": head, "precision": precision,
                               "direction": direction, "label": label, "hardware": hardware, "entries": entries})
        t = next(iter(configs.values()))[0].tags
        out.append(MethodPage(method, t.get(record.METHOD_FAMILY, ""), t.get(record.METHOD_PAPER, ""),
                              t.get(record.METHOD_SUMMARY, ""), entries_of))
    return out


def run_precision(run: StoredRun) -> str:
    """A run's compute precision; runs recorded before the axis existed computed every forward in fp32."""
    return run.tags.get(record.PRECISION, "fp32")


def _backend_rank(name: str) -> tuple[int, str]:
    return (BACKEND_ORDER.index(name) if name in BACKEND_ORDER else len(BACKEND_ORDER), name)


def _make_row(runs: list[StoredRun], head: str) -> Row:
    _, method_params, calib, budget, budget_params, compress = _row_key(runs[0])
    t0 = runs[0].tags
    row = Row(t0.get(record.METHOD, "?"), t0.get(record.METHOD_FAMILY, ""), method_params, calib, budget,
              budget_params, compress, paper=t0.get(record.METHOD_PAPER, ""), summary=t0.get(record.METHOD_SUMMARY, ""))
    by_backend = defaultdict(list)
    for r in runs:
        by_backend[r.tags.get(record.HARDWARE, "?")].append(r)
    primary = sorted(by_backend, key=_backend_rank)[0]
    per_seed = {}
    for r in by_backend[primary]:  # newest first: the first run of each seed wins
        per_seed.setdefault(r.tags.get(record.SEED, "?"), r)
    row.runs = list(per_seed.values())
    for b, rs in by_backend.items():
        row.backends[b] = _backend_cell(rs[0], head)
    metric_names = {n for r in row.runs for n in record.task_metric_names(r.tags)}
    for name in metric_names:
        vals = [r.metrics[name] for r in row.runs if name in r.metrics]
        if vals:
            row.metrics[name], row.metric_std[name] = stats.mean_std(vals)
            se = [r.metrics.get(f"{name}{record.STDERR_SUFFIX}") for r in row.runs]
            if len(vals) == 1 and se[0] is not None:
                row.metric_stderr[name] = se[0]
    for name in record.TRAIN_METRICS:
        vals = [r.metrics[name] for r in row.runs if name in r.metrics]
        if vals:
            row.train[name] = stats.mean_std(vals)[0]
    row.value, row.std = row.metrics.get(head, math.nan), row.metric_std.get(head, 0.0)
    latest = row.runs[0]
    row.converged = latest.tags.get(record.TRAIN_CONVERGED, "")
    row.bits_per_weight = latest.metrics.get(record.BITS_PER_WEIGHT)
    row.artifact_bytes = latest.metrics.get(record.ARTIFACT_BYTES)
    row.date, row.git_commit, row.command = latest.date, latest.git_commit, latest.command
    samples = []
    for r in row.runs:
        for m in r.load_task_metrics() or []:
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
