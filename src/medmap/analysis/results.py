"""The tidy long results table shared by every technique.

One row per (model, layer, concept_set, technique, metric, label, ...) figure. Every technique
returns a :class:`pandas.DataFrame` with at least :data:`COLUMNS`; extra columns (``position``,
``item``, ``window`` ...) are allowed and kept. ``relative_depth = layer / n_layers`` where
``layer`` 0 is the embedding output and ``layer`` l the residual stream after block l, so models
of different depth align on [0, 1]. ``layer`` is -1 for whole-model figures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from medmap.run.outputs import write_parquet_atomic  # noqa: F401  (re-exported: the one writer)

COLUMNS: list[str] = [
    "model",
    "layer",
    "relative_depth",
    "concept_set",
    "technique",
    "metric",
    "label",
    "value",
    "ci_low",
    "ci_high",
    "baseline",
    "n",
    "seed",
]

_DTYPES = {
    "model": "string",
    "layer": "int64",
    "relative_depth": "float64",
    "concept_set": "string",
    "technique": "string",
    "metric": "string",
    "label": "string",
    "value": "float64",
    "ci_low": "float64",
    "ci_high": "float64",
    "baseline": "float64",
    "n": "int64",
    "seed": "int64",
}


def make_rows(rows: list[dict]) -> pd.DataFrame:
    """Build a tidy table from row dicts, filling missing standard columns with nulls.

    Missing ``label`` becomes ``""``, missing ``ci_low``/``ci_high``/``baseline`` NaN, missing
    ``n`` 0 and ``seed`` 0. Column order: standard columns first, then extras in first-seen order.
    """
    df = pd.DataFrame(rows)
    return normalize(df)


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Coerce ``df`` to the standard column set and dtypes (see :data:`COLUMNS`)."""
    df = df.copy()
    defaults = {
        "label": "",
        "ci_low": np.nan,
        "ci_high": np.nan,
        "baseline": np.nan,
        "n": 0,
        "seed": 0,
    }
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = defaults.get(col, np.nan if col in ("value", "relative_depth") else None)
    for col, dt in _DTYPES.items():
        if col in ("n", "seed", "layer"):
            df[col] = pd.to_numeric(df[col]).fillna(-1 if col == "layer" else 0).astype(dt)
        elif dt == "string":
            df[col] = df[col].astype("string")
        else:
            df[col] = pd.to_numeric(df[col]).astype(dt)
    extras = [c for c in df.columns if c not in COLUMNS]
    return df[COLUMNS + extras].reset_index(drop=True)


def relative_depth(layer: int, n_layers: int) -> float:
    """``layer / n_layers``, the one definition of relative depth (0 = embedding output, 1 = after
    the last block); NaN for whole-model figures (``layer < 0``) or an unknown depth
    (``n_layers <= 0``)."""
    layer, n_layers = int(layer), int(n_layers)
    return float("nan") if layer < 0 or n_layers <= 0 else layer / n_layers
