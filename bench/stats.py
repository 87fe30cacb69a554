"""Statistics that say when a difference between two methods is real.

- `bootstrap_ci`: percentile bootstrap confidence interval of a statistic of per-sample values (windows,
  examples), resampling samples with replacement; `bootstrap_replicates` gives the resampled statistics
  themselves (their standard deviation is the bootstrap standard error). A sample may be a row of values
  (e.g. one window's per-token values) when the statistic pools them (e.g. a percentile over all tokens).
- `paired_permutation_test`: two methods scored on the same samples; the null hypothesis is that, per
  sample, the two scores are exchangeable. Randomly swapping each pair (a sign flip of the per-sample
  difference) gives the null distribution of the mean difference; p is two-sided. For perplexity the
  samples are window NLLs, so the test is on log-perplexity; for accuracy they are 0/1 correctness.
- `holm`: Holm-Bonferroni adjustment when one page compares many methods against the best one.

Statistics are chosen by what one per-sample value is (`STATISTICS`), so the interval is always of the
number the task reports (e.g. exp(mean window NLL) is exactly the GPTQ-protocol perplexity, because every
window holds the same number of tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Statistic = Callable[[np.ndarray], np.ndarray]  # (..., n) -> (...): reduce the last axis


def _mean(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1)


def _exp_mean(x: np.ndarray) -> np.ndarray:
    return np.exp(x.mean(axis=-1))


# per-sample kind (Metric.per_sample_name) -> the statistic that turns the samples into the metric value
STATISTICS: dict[str, Statistic] = {
    "window_mean_nll": _exp_mean,  # GPTQ-protocol perplexity = exp(mean NLL) over equal-length windows
    "window_mean_kld": _mean,  # mean token KL vs the base model (equal-length windows: the mean over all tokens)
    "window_top1_agree": _mean,  # share of a window's tokens whose top-1 matches the base model's
    "acc_per_example": _mean,
    "acc_norm_per_example": _mean,
}


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


_CHUNK_BYTES = 64 << 20  # resamples drawn at once are bounded by their size, not only their count


def bootstrap_replicates(samples, statistic: Statistic = _mean, n_boot: int = 2000, seed: int = 0,
                         chunk: int = 250) -> np.ndarray:
    """`statistic` of `n_boot` resamples of `samples` drawn with replacement along the first axis. Samples are
    scalars (the statistic reduces the last axis) or rows (it reduces the last two, e.g. pooling every row)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 0 or x.shape[0] < 2:
        raise ValueError("a bootstrap interval needs at least 2 samples")
    n = x.shape[0]
    chunk = max(1, min(chunk, _CHUNK_BYTES // x.nbytes))
    rng, stats = _rng(seed), []
    for start in range(0, n_boot, chunk):  # chunks bound memory on 10k-example tasks
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        stats.append(statistic(x[idx]))
    return np.concatenate(stats)


def bootstrap_ci(samples, statistic: Statistic = _mean, n_boot: int = 2000,
                 confidence: float = 0.95, seed: int = 0, chunk: int = 250) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(samples)`."""
    return percentile_interval(bootstrap_replicates(samples, statistic, n_boot, seed, chunk), confidence)


def percentile_interval(replicates: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central `confidence` share of bootstrap replicates."""
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(replicates, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_permutation_test(a: Sequence[float], b: Sequence[float], n_perm: int = 5000, seed: int = 0,
                            chunk: int = 250) -> float:
    """Two-sided p-value for "a and b score the samples alike" (paired sign-flip randomization test of the
    mean difference). Exact enumeration when there are at most 2^12 sign patterns."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must have the same length ({x.shape} vs {y.shape})")
    d = x - y
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, observed)
    if d.size <= 12:
        signs = 1 - 2 * ((np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1)
        null = np.abs((signs * d).mean(axis=1))
        return float((null >= observed - tol).mean())
    rng, hits = _rng(seed), 0
    for start in range(0, n_perm, chunk):
        signs = rng.integers(0, 2, size=(min(chunk, n_perm - start), d.size), dtype=np.int8) * 2 - 1
        hits += int((np.abs((signs * d).mean(axis=1)) >= observed - tol).sum())
    return (hits + 1) / (n_perm + 1)  # the observed labelling counts as one of the permutations


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (p.size - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of repeated runs (different seeds)."""
    x = np.asarray(values, dtype=np.float64)
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return float(x.mean()), std
