"""Pareto plots (seaborn/matplotlib): a page's headline metric against a cost (bits per weight, latency,
energy), each method a point coloured by family, the Pareto front drawn as a step line."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench.leaderboard.collect import Page  # noqa: E402


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


def draw(page: Page, out_dir: Path) -> list[dict]:
    """Write one SVG + PNG per cost axis; returns [{stem, title, svg, png}] for the page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    higher = page.direction == "higher"
    made = []
    for stem, xlabel, x_of in cost_axes(page):
        rows = [r for r in page.rows if x_of(r) is not None and math.isfinite(r.value)]
        if not rows:
            continue
        df = pd.DataFrame({"x": [x_of(r) for r in rows], "y": [r.value for r in rows],
                           "family": [r.family or "-" for r in rows], "label": [r.label for r in rows]})
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        sns.scatterplot(data=df, x="x", y="y", hue="family", style="family", s=70, ax=ax)
        front = pareto_front(list(zip(df.x, df.y)), higher)
        f = df.iloc[front]
        ax.step(f.x, f.y, where="post", color="black", lw=1.2, alpha=0.7, label="Pareto front")
        for _, p in df.iterrows():
            ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if df.y.min() > 0 and df.y.max() / df.y.min() > 100:
            ax.set_yscale("log")
        ax.tick_params(axis="x", labelrotation=25, labelsize=7)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(f"{page.metric} ({page.direction} is better)", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{page.slug}__{stem}"
        fig.savefig(out_dir / f"{name}.svg")
        fig.savefig(out_dir / f"{name}.png")
        plt.close(fig)
        made.append({"stem": stem, "title": xlabel, "svg": f"plots/{name}.svg", "png": f"plots/{name}.png"})
    return made
