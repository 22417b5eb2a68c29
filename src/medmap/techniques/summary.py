"""Aggregation shared by the causal techniques: per-item values → tidy rows with bootstrap CIs.

Specificity compares a medical concept set with its control set: ``difference`` = mean(medical)
− mean(control); ``ratio`` = mean(medical) / mean(control). The interval is a percentile
bootstrap that resamples the two sets' items independently (seeded, deterministic).
"""

from __future__ import annotations

import numpy as np

from medmap.analysis.results import relative_depth
from medmap.analysis.stats import bootstrap_ci, spearman_brown, two_sample_ci
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


N_SPLITS = 20  # random item halves per split-half reliability


def _sb(r: float) -> float:
    return spearman_brown(max(float(r), 0.0))


def split_half_rows(
    items,
    *,
    value: str,
    map_name: str,
    item: str = "item_id",
    by: tuple[str, ...] = (),
    n_splits: int = N_SPLITS,
    seed: int = 0,
) -> list[dict]:
    """Split-half reliability of a map row's layer profile over items (tidy rows).

    ``items``: per-item rows (``model, concept_set, layer`` and the columns named by ``item``,
    ``value`` and ``by``). Per group of ``by`` (e.g. the lesion site), ``n_splits`` seeded random
    splits of the items into disjoint halves; per split the mean profile over layers of each half
    and their Pearson correlation ``r``. Row: technique ``stability``, metric ``map_split_half``,
    ``label`` = ``map_name``, ``layer`` −1, ``value`` = the Spearman–Brown corrected mean ``r``
    (``2r̄ / (1 + r̄)``, a negative ``r̄`` counted as 0: no reliability), CI = the corrected 2.5
    and 97.5 % points of the splits' ``r``, ``n`` = items; no row for a group with fewer than 4
    items or 3 layers.
    """
    rows = []
    if len(items) == 0:
        return rows
    groups = items.groupby(list(by), sort=True) if by else [((), items)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        wide = g.pivot_table(index=item, columns="layer", values=value, aggfunc="mean")
        ids = wide.index.to_numpy()
        rel = np.full(n_splits, np.nan)
        if len(ids) < 4 or wide.shape[1] < 3:  # no halves to compare: no row
            continue
        rng = np.random.default_rng([seed, len(ids), wide.shape[1]])
        x = wide.to_numpy(float)
        for s in range(n_splits):
            perm = rng.permutation(len(ids))
            a, b = perm[: len(ids) // 2], perm[len(ids) // 2 :]
            pa, pb = np.nanmean(x[a], 0), np.nanmean(x[b], 0)
            fin = np.isfinite(pa) & np.isfinite(pb)
            if fin.sum() >= 3 and np.std(pa[fin]) > 0 and np.std(pb[fin]) > 0:
                rel[s] = np.corrcoef(pa[fin], pb[fin])[0, 1]
        r = rel[np.isfinite(rel)]  # per split: the halves' Pearson r (corrected below)
        rows.append(
            {
                "model": str(g["model"].iloc[0]),
                "layer": -1,
                "relative_depth": float("nan"),
                "concept_set": str(g["concept_set"].iloc[0]),
                "technique": "stability",
                "metric": "map_split_half",
                "label": map_name,
                "value": _sb(r.mean()) if len(r) else float("nan"),
                "ci_low": _sb(np.percentile(r, 2.5)) if len(r) else float("nan"),
                "ci_high": _sb(np.percentile(r, 97.5)) if len(r) else float("nan"),
                "n": int(len(ids)),
                "seed": seed,
                **dict(zip(by, key)),
            }
        )
    return rows
