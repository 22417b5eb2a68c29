"""The one store of finished work cells: one small Parquet file per cell, written atomically.

A cell is one unit of work. The runner's cells are (technique, concept set) and are named by
their technique and set (``RUN_DIR/parts/<technique>/<set>.parquet``, see
:class:`medmap.run.rundir.Run`); inside a technique, the lesion / patching / saliency sweeps
store finer cells (one chunk of items × one layer) under a content key: the SHA-256 of everything
that determines the result (technique, model identity, arguments, the chunk's prompts and
targets, :func:`cell_key`), so a run restarted with the same arguments finds its finished cells
and skips them, and changed inputs never reuse stale cells. Both kinds live in a
:class:`CellStore`; a cell that exists is finished, nothing else marks progress.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from medmap.run.outputs import write_json_atomic, write_parquet_atomic


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


class CellStore:
    """Finished cells under ``root``, one ``<prefix>-<key>.parquet`` (or ``<key>.parquet`` without
    a prefix) each; ``root=None`` stores nothing (``get`` misses, ``put`` returns its frame).

    ``put`` writes atomically and returns the cell as read back, so fresh and resumed runs hold
    byte-identical frames. ``meta`` (a small JSON dict, e.g. the seconds a cell took) is kept
    next to the cell as ``<name>.json`` and written before it, so a finished cell has its meta.
    """

    def __init__(self, root: str | os.PathLike | None, technique: str | None = None) -> None:
        self.root = None if root is None else Path(root)
        self.technique = technique

    def path(self, key: str) -> Path:
        assert self.root is not None
        name = f"{self.technique}-{key}" if self.technique else key
        return self.root / f"{name}.parquet"

    def has(self, key: str) -> bool:
        return self.root is not None and self.path(key).exists()

    def get(self, key: str) -> pd.DataFrame | None:
        """The stored cell, or ``None`` if it has not been finished."""
        if self.root is None:
            return None
        p = self.path(key)
        return pd.read_parquet(p) if p.exists() else None

    def put(self, key: str, df: pd.DataFrame, meta: dict[str, Any] | None = None) -> pd.DataFrame:
        """Store a finished cell atomically (a crash never leaves a partial file); return it as
        read back (with a root)."""
        if self.root is None:
            return df
        if meta is not None:
            write_json_atomic(self.path(key).with_suffix(".json"), meta)
        write_parquet_atomic(df, self.path(key))
        return pd.read_parquet(self.path(key))

    def meta(self) -> dict[str, dict[str, Any]]:
        """``{key: meta}`` of every cell stored with meta, in sorted file order."""
        if self.root is None or not self.root.exists():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.root.glob("*.json"))}


CellCache = CellStore  # the name the technique sweeps (and their tests) use
