"""Bootstrap intervals and the paired test on synthetic data whose answer is known."""

import itertools
import math

import numpy as np
import pytest

from bench import stats


def test_bootstrap_interval_covers_the_true_mean_at_its_nominal_rate():
    rng = np.random.default_rng(1)
    covered = 0
    for rep in range(200):
        x = rng.normal(loc=3.0, scale=2.0, size=150)
        lo, hi = stats.bootstrap_ci(x, n_boot=1000, seed=rep)
        covered += lo <= 3.0 <= hi
    assert 0.90 <= covered / 200 <= 0.99  # nominal 95%; binomial sd over 200 reps is 1.5 points


def test_bootstrap_interval_width_matches_the_normal_theory_width():
    x = np.random.default_rng(2).normal(0.0, 1.0, size=2000)
    lo, hi = stats.bootstrap_ci(x, n_boot=4000)
    expected = 2 * 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert hi - lo == pytest.approx(expected, rel=0.08)


def test_perplexity_interval_is_of_exp_mean_nll_and_contains_the_point_value():
    nll = np.random.default_rng(3).normal(3.0, 0.3, size=148)  # like 148 GPTQ-protocol windows
    ppl = math.exp(nll.mean())
    lo, hi = stats.bootstrap_ci(nll, stats.STATISTICS["window_mean_nll"])
    assert lo < ppl < hi
    assert math.exp(nll.mean() - 3 * nll.std() / math.sqrt(148)) < lo  # within ~2 standard errors
    assert hi < math.exp(nll.mean() + 3 * nll.std() / math.sqrt(148))


def test_paired_test_matches_exact_enumeration_on_a_small_sample():
    a = np.array([0.3, 1.2, -0.4, 0.8, 0.5, 1.1, 0.9, -0.2, 0.7, 0.6, 1.4, 0.1, 0.2, 0.95])
    b = np.zeros_like(a)
    d = a - b
    flips = np.array(list(itertools.product([1, -1], repeat=d.size)))
    exact = float((np.abs((flips * d).mean(axis=1)) >= abs(d.mean()) - 1e-12).mean())
    mc = stats.paired_permutation_test(a, b, n_perm=20000, seed=0)  # 14 samples: Monte Carlo path
    assert mc == pytest.approx(exact, abs=0.004)
    assert stats.paired_permutation_test(a[:10], b[:10]) == pytest.approx(  # 10 samples: exact path
        float((np.abs((flips[:1024, 4:] * d[:10]).mean(axis=1)) >= abs(d[:10].mean()) - 1e-12).mean()))


def test_paired_test_detects_a_real_shift_and_holds_its_level_without_one():
    rng = np.random.default_rng(4)
    base = rng.normal(0, 1, size=400)  # per-sample difficulty shared by both methods (the pairing)
    shifted = base + 0.15 + rng.normal(0, 0.3, size=400)
    assert stats.paired_permutation_test(shifted, base) < 0.001
    rejections = 0
    for rep in range(200):
        a = base + rng.normal(0, 0.3, size=400)
        b = base + rng.normal(0, 0.3, size=400)
        rejections += stats.paired_permutation_test(a, b, n_perm=500, seed=rep) < 0.05
    assert 0.015 <= rejections / 200 <= 0.10  # size 5%: the test does not cry wolf


def test_paired_test_on_accuracy_vectors():
    rng = np.random.default_rng(5)
    truth = rng.random(1000) < 0.7
    same = truth.copy()
    same[rng.choice(1000, 10, replace=False)] ^= True  # 10 flips: 1 point apart at most
    worse = truth & (rng.random(1000) < 0.85)  # loses ~10 points
    assert stats.paired_permutation_test(truth.astype(float), same.astype(float)) > 0.05
    assert stats.paired_permutation_test(truth.astype(float), worse.astype(float)) < 0.001


def test_holm_adjustment():
    assert stats.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_mean_std_of_seeds():
    assert stats.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert stats.mean_std([5.0]) == (5.0, 0.0)


def test_bootstrap_of_rows_resamples_whole_rows_and_pools_them():
    """Samples that are rows (a window's per-token values): a resample draws whole rows, and a pooled statistic
    (the 99th percentile over all tokens) sees every token of each drawn row."""
    rng = np.random.default_rng(6)
    rows = rng.gamma(0.5, 0.1, size=(12, 300))
    rows[3] *= 20  # one damaged window dominates the tail
    p99 = lambda x: np.quantile(x.reshape(*x.shape[:-2], -1), 0.99, axis=-1)  # noqa: E731
    reps = stats.bootstrap_replicates(rows, p99, n_boot=200, seed=7)
    idx = np.random.default_rng(7).integers(0, 12, size=(200, 12))
    assert reps == pytest.approx([np.quantile(rows[i].ravel(), 0.99) for i in idx])
    lo, hi = stats.bootstrap_ci(rows, p99, n_boot=200, seed=7)
    assert lo < np.quantile(rows, 0.99) < hi and hi / lo > 2  # with or without window 3: a wide interval
    means = stats.bootstrap_replicates(rows.mean(axis=1), n_boot=200, seed=7)  # scalar samples, as before
    assert means == pytest.approx(rows.mean(axis=1)[idx].mean(axis=1))
    with pytest.raises(ValueError, match="at least 2 samples"):
        stats.bootstrap_replicates(rows[:1], p99)
