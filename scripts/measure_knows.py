"""Measure the forced-choice knowledge table of docs/concepts.md (every set, both bundled models).

Equivalent to ``medmap knows -m MODEL -c SET --max-items 12 --seed 0 --out DIR/MODEL-SET.parquet``
for every model and set, but each model is loaded once::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/measure_knows.py --out-dir /tmp/knows

Writes ``DIR/MODEL-SET.parquet`` (the rows of :func:`medmap.techniques.knowledge.knows`),
``DIR/summary.csv`` (one row per model and set: ``n`` targets scored, ``known``, ``chance``,
``control`` = moved-answer control, ``control_chance``, ``known_norm`` and ``first_token`` =
fraction whose best answer's first token ranks in the top ``k``; fractions in 0-1) and prints a
Markdown table with a 95 % binomial half-width ``ci`` = 1.96 * sqrt(p(1-p)/n) for ``known``.
``first_token`` is the mean over every row of the set, as ``medmap knows`` prints it.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd

MODELS = ("smollm2-135m", "gemma3-270m")


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per (model, concept_set): :func:`known_fraction` plus ``first_token`` (fraction, 0-1)."""
    from medmap.techniques.knowledge import known_fraction

    out = known_fraction(df)
    first = df.groupby(["model", "concept_set"])["first_token_known"].mean().rename("first_token")
    return out.merge(first.reset_index(), on=["model", "concept_set"], how="left")


def markdown(summary: pd.DataFrame, models: list[str], sets: list[str]) -> str:
    """The docs table: one line per set, known (± CI) / chance / moved / first-token per model."""
    head = "| set | n |" + "".join(f" {m} known | chance | moved | first-token |" for m in models)
    lines = [head, "|---|---|" + "---|---|---|---|" * len(models)]
    for s in sets:
        rows = {r.model: r for r in summary[summary.concept_set == s].itertuples(index=False)}
        if not rows:
            continue
        n = sorted({int(r.n) for r in rows.values()})
        cells = [s, "/".join(map(str, n))]
        for m in models:
            r = rows.get(m)
            if r is None:
                cells += ["–"] * 4
                continue
            ci = 1.96 * math.sqrt(r.known * (1 - r.known) / r.n)
            cells += [
                f"{r.known:.0%} ± {ci * 100:.0f}",
                f"{r.chance:.0%}",
                f"{r.control:.0%}",
                f"{r.first_token:.0%}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from medmap.concepts import list_concepts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--sets", nargs="+", default=None, help="default: every bundled set")
    ap.add_argument("--max-items", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/knows"))
    args = ap.parse_args(argv)

    from medmap.analysis.results import write_parquet_atomic
    from medmap.model.loading import load_model
    from medmap.techniques.knowledge import knows

    sets = args.sets or list_concepts()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    frames = []
    for name in args.models:
        t0 = time.time()
        model = load_model(name)
        print(f"{name}: loaded in {time.time() - t0:.0f} s", flush=True)
        for s in sets:
            t0 = time.time()
            df = knows(model, s, k=args.k, max_items=args.max_items, seed=args.seed)
            write_parquet_atomic(df, args.out_dir / f"{name}-{s}.parquet")
            frames.append(df)
            r = summarise(df).iloc[0]
            print(
                f"{name} {s}: n={int(r.n)} known={r.known:.0%} chance={r.chance:.0%} "
                f"moved={r.control:.0%} first={r.first_token:.0%} ({time.time() - t0:.0f} s)",
                flush=True,
            )
        del model
    summary = summarise(pd.concat(frames, ignore_index=True))
    summary.to_csv(args.out_dir / "summary.csv", index=False)
    print(markdown(summary, args.models, sets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
