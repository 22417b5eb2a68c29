"""Bootstrap confidence intervals: the one resampling helper every technique and map uses.

:func:`bootstrap_ci` resamples one sample, :func:`two_sample_ci` two samples independently
(first all draws of ``a``, then all draws of ``b``, from one generator seeded by ``seed``); both
draw their indices with :func:`bootstrap_indices`, so the same seed gives the same resamples
everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bootstrap_indices(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """``(n_boot, n)`` indices drawn with replacement from ``0..n-1``."""
    return rng.integers(0, n, size=(n_boot, n))


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
    idx = bootstrap_indices(np.random.default_rng(seed), n, n_boot)
    boots = np.array([statistic(values[i]) for i in idx], dtype=float)
    lo, hi = np.nanquantile(boots, [alpha / 2, 1 - alpha / 2])
    return est, float(lo), float(hi)


def two_sample_ci(
    a: np.ndarray,
    b: np.ndarray,
    *,
    statistic: Callable[[np.ndarray, np.ndarray], float] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap of ``statistic(a, b)``, resampling ``a`` and ``b`` independently.

    ``statistic`` defaults to ``mean(a) - mean(b)`` (computed for all resamples at once).
    Returns ``(estimate, ci_low, ci_high)``; NaN resamples (e.g. a ratio over a zero mean) are
    ignored. With fewer than two values in both samples the interval collapses onto the
    estimate.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    stat = statistic or (lambda x, y: x.mean() - y.mean())
    est = float(stat(a, b))
    rng = np.random.default_rng(seed)
    ia = bootstrap_indices(rng, len(a), n_boot)
    ib = bootstrap_indices(rng, len(b), n_boot)
    if len(a) < 2 and len(b) < 2:
        return est, est, est
    if statistic is None:
        boots = a[ia].mean(axis=1) - b[ib].mean(axis=1)
    else:
        boots = np.array([statistic(a[i], b[j]) for i, j in zip(ia, ib)], dtype=float)
    lo, hi = np.nanquantile(boots, [alpha / 2, 1 - alpha / 2])
    return est, float(lo), float(hi)


def spearman_brown(r: float) -> float:
    """Split-half correlation ``r`` → reliability of the full length, ``2r / (1 + r)``."""
    if not np.isfinite(r) or r <= -1:
        return float("nan")
    return float(2 * r / (1 + r))


def profile_reliability(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman–Brown corrected Pearson correlation of two half profiles over layers (NaN
    when fewer than 3 finite layers or a profile is constant; a negative correlation counts as
    0, no reliability, as in :func:`medmap.techniques.summary.split_half_rows`)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return spearman_brown(max(float(np.corrcoef(a[ok], b[ok])[0, 1]), 0.0))
