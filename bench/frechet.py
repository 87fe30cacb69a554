"""The Frechet distance between two feature sets (Heusel et al. 2017's formula): what FID computes on Inception-v3
features and `fd_lenet` on the suite's LeNet features."""

from __future__ import annotations

import numpy as np

def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two feature sets (rows = samples), the formula
    of Heusel et al. (2017). The square root of S1 S2 comes from the symmetric form
    (S1^(1/2) S2 S1^(1/2))^(1/2), whose eigenvalues are real and non-negative: exact 0 for identical sets."""
    return frechet_from_stats(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def frechet_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The same distance from means and covariances (the form reference statistics files store)."""
    w, v = np.linalg.eigh(s1)  # S1 is symmetric PSD: its square root by eigendecomposition
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return max(fd, 0.0)
