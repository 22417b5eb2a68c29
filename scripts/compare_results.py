"""Do two runs' tidy tables agree? Same rows, numeric values equal within a tolerance.

Used to check that a refactor keeps behaviour: run ``medmap map`` on the old and the new code
into two directories, then::

    .venv/bin/python scripts/compare_results.py OLD_RUN NEW_RUN [--tol 1e-6] [--file results.parquet]

Rows are matched on every non-numeric column plus ``layer`` and ``n``/``seed`` (the row's
identity); every float column is compared with ``|a - b| <= tol`` (NaN equals NaN). Rows only in
NEW are listed separately (a redesign may add rows; it may not drop or change one). Exit code 0
when every OLD row is in NEW with equal values, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def _key_columns(df: pd.DataFrame) -> list[str]:
    keys = [c for c in df.columns if not pd.api.types.is_float_dtype(df[c])]
    return keys


def compare(old: pd.DataFrame, new: pd.DataFrame, tol: float) -> dict:
    """Compare two tidy tables; returns counts and the worst differences."""
    keys = [c for c in _key_columns(old) if c in new.columns]
    floats = [c for c in old.columns if pd.api.types.is_float_dtype(old[c]) and c in new.columns]

    def norm(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        for c in keys:
            df[c] = df[c].astype("string").fillna("<NA>")
        return df

    o, n = norm(old), norm(new)
    dup_o = int(o.duplicated(keys).sum())
    dup_n = int(n.duplicated(keys).sum())
    o["_occ"] = o.groupby(keys, dropna=False).cumcount()
    n["_occ"] = n.groupby(keys, dropna=False).cumcount()
    m = o.merge(n, on=[*keys, "_occ"], how="outer", suffixes=("_old", "_new"), indicator=True)
    only_old = int((m["_merge"] == "left_only").sum())
    only_new = int((m["_merge"] == "right_only").sum())
    both = m[m["_merge"] == "both"]
    worst: dict[str, float] = {}
    n_bad = 0
    bad_mask = np.zeros(len(both), dtype=bool)
    for c in floats:
        a = both[f"{c}_old"].to_numpy(float)
        b = both[f"{c}_new"].to_numpy(float)
        diff = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b))
        diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only
        worst[c] = float(diff.max()) if len(diff) else 0.0
        bad_mask |= diff > tol
    n_bad = int(bad_mask.sum())
    examples = both[bad_mask].head(5)[[*keys, *[f"{c}_old" for c in floats[:2]]]]
    return {
        "rows_old": len(old),
        "rows_new": len(new),
        "matched": len(both),
        "only_old": only_old,
        "only_new": only_new,
        "duplicate_keys_old": dup_o,
        "duplicate_keys_new": dup_n,
        "values_beyond_tol": n_bad,
        "max_abs_diff": worst,
        "examples": examples,
        "new_only_rows": m[m["_merge"] == "right_only"][keys].head(10),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--file", default="results.parquet")
    args = ap.parse_args(argv)
    old = pd.read_parquet(args.old / args.file if args.old.is_dir() else args.old)
    new = pd.read_parquet(args.new / args.file if args.new.is_dir() else args.new)
    r = compare(old, new, args.tol)
    print(
        f"{args.file}: old {r['rows_old']} rows, new {r['rows_new']} rows, matched {r['matched']}, "
        f"only in old {r['only_old']}, only in new {r['only_new']}, "
        f"values beyond {args.tol:g}: {r['values_beyond_tol']}"
    )
    print(
        "max |old - new| per column: "
        + ", ".join(f"{k} {v:.3g}" for k, v in r["max_abs_diff"].items())
    )
    if r["values_beyond_tol"]:
        print(r["examples"].to_string())
    if r["only_new"]:
        print("rows only in new (first 10):\n" + r["new_only_rows"].to_string())
    ok = r["only_old"] == 0 and r["values_beyond_tol"] == 0
    print("AGREE" if ok else "DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
