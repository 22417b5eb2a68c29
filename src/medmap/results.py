"""The tidy long results table shared by every technique.

One row per (model, layer, concept_set, technique, metric, label, ...) figure. Every technique
returns a :class:`pandas.DataFrame` with at least :data:`COLUMNS`; extra columns (``position``,
``item``, ``window`` ...) are allowed and kept. ``relative_depth = layer / n_layers`` where
``layer`` 0 is the embedding output and ``layer`` l the residual stream after block l, so models
of different depth align on [0, 1]. ``layer`` is -1 for whole-model figures.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

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


def write_parquet_atomic(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` as Parquet via a temporary file in the same directory, then rename.

    A failed write (disk full, permission denied ...) removes the temporary file and raises a
    one-line :class:`~medmap.errors.MedmapError` (:func:`medmap.outputs.write_error`).
    """
    from medmap.outputs import write_error

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(e, path) from e
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(e, path) from e
        raise
    return path
