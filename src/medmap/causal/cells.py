"""Resumable work cells: one small Parquet file per finished cell, named by a hash of its inputs.

A cell is one unit of a technique's work (e.g. lesion of one layer on one chunk of items of one
concept set). Its key is the SHA-256 of everything that determines its result (technique,
model identity, arguments, the chunk's prompts and targets), so a run restarted with the same
arguments finds its finished cells and skips them, and changed inputs never reuse stale cells.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from medmap.results import write_parquet_atomic


def model_identity(model) -> dict[str, Any]:
    """What identifies a model's weights for cell keys (name, weights hash, shape)."""
    return {
        "name": model.name,
        "weights": getattr(model, "weights_hash", ""),
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "dtype": str(next(model.hf.parameters()).dtype),
    }


def cell_key(**parts: Any) -> str:
    """Stable hex key of JSON-serialisable ``parts`` (order-independent)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class CellCache:
    """Finished cells under ``root`` (``None`` = no caching: ``get`` misses, ``put`` is a no-op)."""

    def __init__(self, root: str | os.PathLike | None, technique: str) -> None:
        self.root = None if root is None else Path(root)
        self.technique = technique

    def path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / f"{self.technique}-{key}.parquet"

    def get(self, key: str) -> pd.DataFrame | None:
        """The stored cell, or ``None`` if it has not been finished."""
        if self.root is None:
            return None
        p = self.path(key)
        return pd.read_parquet(p) if p.exists() else None

    def put(self, key: str, df: pd.DataFrame) -> pd.DataFrame:
        """Store a finished cell atomically (a crash never leaves a partial file).

        Returns the cell as read back (with caching on), so fresh and resumed runs hold
        byte-identical frames.
        """
        if self.root is None:
            return df
        write_parquet_atomic(df, self.path(key))
        return pd.read_parquet(self.path(key))
