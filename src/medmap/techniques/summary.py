"""Aggregation shared by the causal techniques: per-item values → tidy rows with bootstrap CIs.

Specificity compares a medical concept set with its control set: ``difference`` = mean(medical)
− mean(control); ``ratio`` = mean(medical) / mean(control). The interval is a percentile
bootstrap that resamples the two sets' items independently (seeded, deterministic).
"""

from __future__ import annotations

import numpy as np

from medmap.analysis.results import relative_depth
from medmap.analysis.stats import bootstrap_ci, two_sample_ci
from medmap.errors import MedmapError


def mean_ci(values, *, n_boot: int, seed: int) -> tuple[float, float, float, int]:
    """``(mean, ci_low, ci_high, n)`` over the finite entries of ``values``."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    est, lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
    return est, lo, hi, len(v)


def specificity_ci(
    medical, control, *, kind: str = "difference", n_boot: int = 200, seed: int = 0
) -> tuple[float, float, float]:
    """Medical effect relative to control effect, with a two-sample bootstrap interval."""
    a = np.asarray(medical, dtype=float)
    b = np.asarray(control, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        raise MedmapError("specificity needs at least one medical and one control value")
    if kind == "difference":
        stat = lambda x, y: x.mean() - y.mean()
    elif kind == "ratio":
        stat = lambda x, y: x.mean() / y.mean() if y.mean() != 0 else np.nan
    else:
        raise MedmapError(f"unknown specificity kind {kind!r}", hint="use 'difference' or 'ratio'")
    return two_sample_ci(a, b, statistic=stat, n_boot=n_boot, seed=seed)


def specificity_row(
    g, c, *, layer: int, technique: str, metric: str, kind: str, n_boot: int, seed: int, **extra
) -> dict:
    """One tidy row: specificity of ``metric`` between medical rows ``g`` and control rows ``c``
    (DataFrames of one layer with ``model``, ``n_layers``, ``concept_set``), extra columns kept.

    The row's ``control_set`` column names the control set; it is what marks a specificity row
    (``concept_set`` is the display name ``<medical>-vs-<control>``)."""
    est, lo, hi = specificity_ci(
        g[metric].to_numpy(), c[metric].to_numpy(), kind=kind, n_boot=n_boot, seed=seed
    )
    return {
        "model": g["model"].iloc[0],
        "layer": int(layer),
        "relative_depth": relative_depth(int(layer), int(g["n_layers"].iloc[0])),
        "concept_set": f"{g['concept_set'].iloc[0]}-vs-{c['concept_set'].iloc[0]}",
        "technique": technique,
        "metric": f"specificity_{metric}",
        "label": kind,
        "value": est,
        "ci_low": lo,
        "ci_high": hi,
        "n": len(g) + len(c),
        "seed": seed,
        "control_set": str(c["concept_set"].iloc[0]),
        **extra,
    }
