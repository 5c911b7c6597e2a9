"""95% confidence intervals of eval scores: percentile bootstrap over questions.

A score in the report is a mean over n questions; its interval says how far another draw of n
questions from the same distribution could move it. The difference between two models is
bootstrapped *paired* (both models' answers to the same resampled questions), which is far
tighter than comparing two separate intervals, since the questions' difficulty is shared.
Seeded, so a report is reproducible.
"""

from __future__ import annotations

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def _resampled_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    return values[idx].mean(axis=1)


def _bounds(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_ci(values, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (one per question)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    return _bounds(_resampled_means(v, n_boot, seed), level)


def paired_difference_ci(a, b, n_boot: int = N_BOOT, level: float = LEVEL,
                         seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, lower, upper): `a[i]` and `b[i]` score the same question."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired_difference_ci needs two equal, non-empty score lists ({a.shape} vs {b.shape})")
    d = a - b
    lo, hi = _bounds(_resampled_means(d, n_boot, seed), level)
    return float(d.mean()), lo, hi
