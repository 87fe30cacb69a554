"""The plots of a page (matplotlib, seaborn's palette), as SVG + PNG.

- Pareto plots: the headline metric against each cost the page has numbers for (bits per weight, latency, energy),
  every row a point coloured by family, the Pareto front a step line. The bits-per-weight plot is the figure papers
  draw: every family on one plot, a method's rows joined by a line in order of bits, log-y for perplexity.
- Quality against training budget: for the rows of methods that train, the headline metric against training tokens
  seen (and against training wall seconds), log-x, one line per configuration across budgets, each point marked
  converged or not (`train.converged`); the page's rows without training (PTQ methods, the baseline) are
  horizontal reference lines.

Each row's point carries the SVG id `row-<rank>` (its `#` on the page), so a test can check that every row with a
value is drawn.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from bench import record  # noqa: E402
from bench.record import fmt  # noqa: E402
from bench.leaderboard.collect import Page, Row  # noqa: E402

MARKERS = "osD^vP*Xhp<>"


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (x, lower is better) and quality (y)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if higher_is_better
                                                      else points[i][1]))
    front, best = [], None
    for i in order:
        y = points[i][1]
        if best is None or (y > best if higher_is_better else y < best):
            front.append(i)
            best = y
    return front


def cost_axes(page: Page) -> list[tuple[str, str, callable]]:
    """(file stem, axis label, row -> x or None) for every cost this page has numbers for."""
    axes = [("bits", "bits per weight (block linears, all overheads)", lambda r: r.bits_per_weight)]
    for b in page.backends:
        cells = [r.backends.get(b) for r in page.rows]
        if any(c and c.prefill_ms for c in cells):
            n = next(c.prefill_tokens for c in cells if c and c.prefill_tokens)
            axes.append((f"latency_{b}", f"prefill latency p50, {n} tokens, {b} (ms)",
                         lambda r, b=b: r.backends[b].prefill_ms if b in r.backends else None))
        sources = {c.energy_source for c in cells if c and c.energy_j_per_token}
        if len(sources) == 1:  # never mix a measurement and an estimate on one axis
            src = sources.pop()
            kind = "estimate" if src.startswith("model:") else "measured"
            axes.append((f"energy_{b}", f"energy per prefill token, {b} (J; {kind}, source {src})",
                         lambda r, b=b: r.backends[b].energy_j_per_token if b in r.backends else None))
    return axes


def is_perplexity(metric: str) -> bool:
    return any(w in metric.lower() for w in ("ppl", "perplexity"))


def _log_y(page: Page, ys: list[float]) -> bool:
    """Log-y for perplexity (papers' convention: compressed models span orders of magnitude), or any positive metric
    whose values span more than 100x."""
    return min(ys) > 0 and (is_perplexity(page.metric) or max(ys) / min(ys) > 100)


def _styles(rows: list[Row]) -> dict[str, tuple]:
    families = sorted({r.family or "-" for r in rows})
    palette = sns.color_palette("tab10", max(3, len(families)))
    return {f: (palette[i % len(palette)], MARKERS[i % len(MARKERS)]) for i, f in enumerate(families)}


def _finish(fig, ax, page: Page, xlabel: str, out_dir: Path, stem: str, title: str, handles: list) -> dict:
    ax.autoscale_view()
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers on log axes too (no 2.5x10^2 within one decade)
        if axis.get_scale() == "log":
            axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v, 3)))
            axis.set_minor_formatter(FuncFormatter(lambda v, _, axis=axis: fmt(v, 3) if _few_ticks(axis) else ""))
    ax.tick_params(axis="both", which="both", labelsize=7)
    ax.tick_params(axis="x", labelrotation=25)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(f"{page.metric} ({page.direction} is better)", fontsize=8)
    ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    name = f"{page.slug}__{stem}"
    fig.savefig(out_dir / f"{name}.svg")
    fig.savefig(out_dir / f"{name}.png")
    plt.close(fig)
    return {"stem": stem, "title": title, "svg": f"plots/{name}.svg", "png": f"plots/{name}.png"}


def _few_ticks(axis) -> bool:
    """Label the minor ticks of a log axis only when it spans less than a decade (no major tick to read)."""
    lo, hi = sorted(axis.get_view_interval())
    return lo > 0 and hi / lo < 10


def _pareto(page: Page, stem: str, xlabel: str, x_of, out_dir: Path) -> dict | None:
    rank = {id(r): i for i, r in enumerate(page.rows, 1)}
    rows = [r for r in page.rows if x_of(r) is not None and math.isfinite(r.value)]
    if not rows:
        return None
    styles = _styles(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    if stem == "bits":  # a method's settings (bit widths, group sizes) joined in order of bits
        by_method = defaultdict(list)
        for r in rows:
            by_method[r.method].append(r)
        for same in by_method.values():
            if len(same) > 1:
                same.sort(key=x_of)
                ax.plot([x_of(r) for r in same], [r.value for r in same], color=styles[same[0].family or "-"][0],
                        lw=0.9, alpha=0.5)
    for r in rows:
        color, marker = styles[r.family or "-"]
        ax.scatter([x_of(r)], [r.value], color=color, marker=marker, s=45, gid=f"row-{rank[id(r)]}", zorder=3)
        ax.annotate(r.label, (x_of(r), r.value), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = [rows[i] for i in pareto_front([(x_of(r), r.value) for r in rows], page.direction == "higher")]
    ax.step([x_of(r) for r in front], [r.value for r in front], where="post", color="black", lw=1.2, alpha=0.7)
    if _log_y(page, [r.value for r in rows]):
        ax.set_yscale("log")
    handles = [Line2D([], [], color=c, marker=m, ls="", label=f) for f, (c, m) in styles.items()]
    handles.append(Line2D([], [], color="black", lw=1.2, alpha=0.7, label="Pareto front"))
    title = "bits per weight, every family on one plot" if stem == "bits" else xlabel
    return _finish(fig, ax, page, xlabel, out_dir, stem, title, handles)


def _training_budget(page: Page, stem: str, key: str, xlabel: str, out_dir: Path) -> dict | None:
    rank = {id(r): i for i, r in enumerate(page.rows, 1)}
    trained = [r for r in page.rows if (r.train.get(key) or 0) > 0 and math.isfinite(r.value)]
    if not trained:
        return None
    reference = [r for r in page.rows if not r.train and math.isfinite(r.value)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    lines = defaultdict(list)
    for r in trained:
        lines[r.line_key].append(r)
    palette = sns.color_palette("tab10", max(3, len(lines)))
    handles = []
    for i, same in enumerate(lines.values()):
        same.sort(key=lambda r: r.train[key])
        color = palette[i % len(palette)]
        ax.plot([r.train[key] for r in same], [r.value for r in same], color=color, lw=1.2)
        for r in same:  # filled: converged; hollow: not converged; x: no convergence verdict recorded
            style = ({"marker": "o", "color": color} if r.converged == "true" else
                     {"marker": "o", "facecolors": "none", "edgecolors": color} if r.converged == "false" else
                     {"marker": "x", "color": color})
            ax.scatter([r.train[key]], [r.value], s=50, gid=f"row-{rank[id(r)]}", zorder=3, **style)
        handles.append(Line2D([], [], color=color, lw=1.2, label=same[0].config_label))
    for r in reference:
        ax.axhline(r.value, color="0.45", ls="--", lw=0.8)
        ax.annotate(r.label, (1.0, r.value), xycoords=("axes fraction", "data"), xytext=(-4, 2),
                    textcoords="offset points", ha="right", fontsize=6, color="0.3")
    ax.set_xscale("log")
    if _log_y(page, [r.value for r in trained + reference]):
        ax.set_yscale("log")
    handles += [Line2D([], [], color="0.3", marker="o", ls="", label="converged"),
                Line2D([], [], color="0.3", marker="o", markerfacecolor="none", ls="", label="not converged"),
                Line2D([], [], color="0.3", marker="x", ls="", label="no verdict recorded"),
                Line2D([], [], color="0.45", ls="--", lw=0.8, label="no training (reference)")]
    return _finish(fig, ax, page, xlabel, out_dir, stem, f"quality vs training budget: {xlabel}", handles)


def draw(page: Page, out_dir: Path) -> list[dict]:
    """Write every plot of the page; returns [{stem, title, svg, png}]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [_pareto(page, stem, xlabel, x_of, out_dir) for stem, xlabel, x_of in cost_axes(page)]
    made += [_training_budget(page, "train_tokens", record.TRAIN_TOKENS_SEEN,
                              "training tokens seen (log)", out_dir),
             _training_budget(page, "train_seconds", record.TRAIN_SECONDS, "training wall seconds (log)", out_dir)]
    return [m for m in made if m is not None]
