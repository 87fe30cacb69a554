"""Render the static site: index, one page per (model, task, headline metric), one per method (its runs over time),
plots, CSV/JSON, and a copy of every published record shown.

Every row says where it comes from (a published record, with its file, or the local store), the git commit it ran
and the `python -m bench ...` line that reproduces it, with a copy button. Everything a user could control (method
names, configs, commands, error texts) passes through Jinja2 autoescape; the script is a separate file under a
Content-Security-Policy that forbids inline scripts, and no data is embedded as code. The site opens from disk
(file://) or any static host: no server, no CDN.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import shutil
from pathlib import Path
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, select_autoescape

from bench import published, record, stats, tracking
from bench.leaderboard import plots
from bench.leaderboard.collect import Page, Row, build_method_pages, build_pages, load_runs, store_exists
from bench.record import fmt

STATIC = Path(__file__).parent / "static"


def num(v) -> str:
    """Sort key written into data-sort: plain digits, blank when there is no number."""
    return "" if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) else repr(float(v))


def mb(v):
    return None if v is None else v / 1e6


def rel(row: Row, page: Page) -> str:
    """Relative to the uncompressed baseline: a ratio for perplexity-like metrics, points for fractions."""
    if row.rel_to_baseline is None:
        return "-"
    if page.direction == "higher" and 0.0 <= row.value <= 1.0:  # a fraction such as accuracy
        base = row.value / row.rel_to_baseline
        return f"{(row.value - base) * 100:+.1f} pts"
    return f"x{row.rel_to_baseline:.3g}"


def records(pages: list[Page]) -> list[dict]:
    """One flat record per row, for CSV/JSON export (pandas-friendly)."""
    out = []
    for p in pages:
        for rank, r in enumerate(p.rows, 1):
            rec = {"model": p.model, "task": p.task, "metric": p.metric, "precision": p.precision,
                   "direction": p.direction, "rank": rank,
                   "method": r.method, "label": r.label, "family": r.family, "value": r.value,
                   "std_over_seeds": r.std, "n_seeds": len(r.runs), "seeds": ";".join(r.seeds),
                   "ci95_low": r.ci[0] if r.ci else None, "ci95_high": r.ci[1] if r.ci else None,
                   "p_vs_best_holm": r.p_vs_best, "is_best": r.is_best, "indistinguishable_from_best": r.indistinguishable,
                   "rel_to_baseline": r.rel_to_baseline, "bits_per_weight": r.bits_per_weight,
                   "artifact_bytes": r.artifact_bytes, "calib": r.calib, "budget": r.budget,
                   "method_params": json.dumps(r.method_params, sort_keys=True), "date": r.date,
                   "git_commit": r.git_commit, "command": r.command, "source": r.source,
                   "record_files": ";".join(r.record_files), "run_ids": ";".join(r.run_ids)}
            rec.update({name: r.train.get(name) for name in sorted(r.train)})
            if r.converged:
                rec[record.TRAIN_CONVERGED] = r.converged
            for name in p.metrics[1:]:
                rec[name] = r.metrics.get(name)
            for b, c in r.backends.items():
                rec.update({f"{b}.status": c.status, f"{b}.prefill_ms": c.prefill_ms,
                            f"{b}.decode_tokens_per_s": c.decode_tokens_per_s,
                            f"{b}.energy_j_per_token": c.energy_j_per_token, f"{b}.energy_source": c.energy_source,
                            f"{b}.execution": c.execution, f"{b}.deployed_value": c.deployed_value,
                            f"{b}.deployed_execution": c.deployed_execution})
            out.append(rec)
    return out


def _write_exports(pages: list[Page], data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    recs = records(pages)
    (data_dir / "leaderboard.json").write_text(json.dumps(recs, indent=1, default=str))
    columns = list(dict.fromkeys(k for r in recs for k in r))
    with open(data_dir / "leaderboard.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(recs)


def build_site(results_dir: str | Path, out_dir: str | Path | None = None,
               mlflow_url: str = "http://127.0.0.1:5000", records_dir: str | Path | None = None) -> Path:
    """The site from the local store at `results_dir` (if there is one; reading never creates it) and the published
    records under `records_dir` (None: none)."""
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir else results_dir / "site"
    runs = load_runs(results_dir, records_dir)
    pages, orphans = build_pages(results_dir, records_dir, runs)
    method_pages = build_method_pages(runs, pages)
    if out.exists():
        shutil.rmtree(out)  # the site is derived data: rebuilt whole, never patched
    (out / "static").mkdir(parents=True)
    for f in STATIC.iterdir():
        shutil.copy(f, out / "static" / f.name)
    shown = _copy_records(runs, records_dir, out / "records")
    env = Environment(loader=PackageLoader("bench.leaderboard", "templates"),
                      autoescape=select_autoescape(["html", "j2"], default=True), trim_blocks=True, lstrip_blocks=True)
    has_store = store_exists(results_dir)
    store = tracking.tracking_uri(results_dir) if has_store else "none here"
    exp_id = _experiment_id() if has_store else "0"
    n_published = sum(r.source == "published" for r in runs if r.status == "FINISHED")
    common = {"fmt": fmt, "num": num, "mb": mb, "root": "", "store": store, "has_store": has_store,
              "mlflow_url": mlflow_url,
              "records_dir": str(records_dir) if records_dir else "", "n_published": n_published,
              "n_local": sum(r.status == "FINISHED" for r in runs) - n_published,
              "method_slugs": {m.method: m.slug for m in method_pages},
              "record_url": lambda name: f"records/{quote(name)}" if name in shown else "",
              "built": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "run_url": lambda rid: f"{mlflow_url}/#/experiments/{quote(exp_id)}/runs/{quote(rid)}"}
    (out / "index.html").write_text(env.get_template("index.html.j2").render(
        pages=pages, orphans=orphans, method_pages=method_pages, **common))
    page_t = env.get_template("page.html.j2")
    for p in pages:
        notes = sorted({(m, n) for r in p.rows for m, n in r.notes.items()
                        if m != "per_sample_name" and not str(n).startswith("exact")})
        html = page_t.render(page=p, plots=plots.draw(p, out / "plots"), rel=rel, data_notes=notes,
                             has_stats=p.statistic in stats.STATISTICS, **common)
        (out / f"{p.slug}.html").write_text(html)
    method_t = env.get_template("method.html.j2")
    for m in method_pages:
        (out / f"{m.slug}.html").write_text(method_t.render(mpage=m, **common))
    _write_exports(pages, out / "data")
    return out / "index.html"


def _copy_records(runs, records_dir, to: Path) -> set[str]:
    """Copies of the published records the site shows (so that each row links to its file); their names."""
    names = {r.record_file for r in runs if r.record_file}
    if not records_dir or not Path(records_dir).is_dir() or not names:
        return set()
    to.mkdir(parents=True)
    copied = set()
    for p in published.record_files([records_dir]):
        if p.name in names:
            shutil.copy(p, to / p.name)
            copied.add(p.name)
    return copied


def _experiment_id() -> str:
    from mlflow.tracking import MlflowClient

    exp = tracking.retry(MlflowClient().get_experiment_by_name, tracking.EXPERIMENT)
    return exp.experiment_id if exp else "0"
