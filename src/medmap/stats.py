"""Small statistics helpers shared by all techniques (bootstrap confidence intervals)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bootstrap_ci(
    values: np.ndarray,
    *,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap of ``statistic`` over the first axis of ``values``.

    Returns ``(estimate, ci_low, ci_high)``; the interval is the central ``1 - alpha`` range of
    ``n_boot`` resamples drawn with a generator seeded by ``seed`` (deterministic). With fewer
    than two values the interval collapses onto the estimate.
    """
    values = np.asarray(values)
    est = float(statistic(values))
    n = len(values)
    if n < 2:
        return est, est, est
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boots = np.array([statistic(values[i]) for i in idx], dtype=float)
    lo, hi = np.nanquantile(boots, [alpha / 2, 1 - alpha / 2])
    return est, float(lo), float(hi)
