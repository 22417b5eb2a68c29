"""``medmap report``, ``medmap compare`` and ``medmap query``: everything that reads run dirs."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="run directory written by `medmap map`")],
    no_figures: Annotated[bool, typer.Option("--no-figures", help="skip PNG/SVG figures")] = False,
) -> None:
    """Rebuild report.html (and figures/, knowledge_map.parquet, findings.parquet) of a run."""
    from medmap.analysis.maps import build_outputs
    from medmap.report.html import build_report

    build_outputs(run_dir)  # the knowledge map and findings, from results.parquet
    path = build_report(run_dir, figures=not no_figures)
    console.print(f"[bold green]wrote[/] {path}")


def compare_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    run_dirs: Annotated[
        list[Path] | None, typer.Argument(help="run directories to compare", show_default=False)
    ] = None,
    max_items: Annotated[int, typer.Option(help="items per concept set for CKA")] = 512,
) -> None:
    """Side-by-side knowledge maps, layer-to-layer CKA between models and all findings."""
    from medmap.analysis.compare import compare_runs
    from medmap.errors import MedmapError

    if not run_dirs:  # optional in the signature so that this is a one-line error, not usage
        raise MedmapError(
            "compare needs at least one RUN_DIR", hint="medmap compare RUN... --out DIR"
        )
    path = compare_runs(run_dirs, out, max_items=max_items)
    console.print(f"[bold green]wrote[/] {path} and {path.parent / 'compare.parquet'}")


def query_views(con, run_dirs: list[Path]) -> list[str]:
    """Register views over the runs' Parquet files in a DuckDB connection; returns their names.

    ``results`` (every ``results.parquet``), ``coords`` (``umap_coords.parquet``), ``map``
    (``knowledge_map.parquet``) and ``findings`` (``findings.parquet``), each the union of the
    runs' files by column name, plus a column ``run_dir``.
    """
    from medmap.errors import MedmapError

    for rd in run_dirs:
        if not (rd / "results.parquet").exists():
            raise MedmapError(
                f"{rd} has no results.parquet", hint="pass directories written by `medmap map`"
            )
    made = []
    for view, fname in (
        ("results", "results.parquet"),
        ("coords", "umap_coords.parquet"),
        ("map", "knowledge_map.parquet"),
        ("findings", "findings.parquet"),
    ):
        files = [str((rd / fname).resolve()) for rd in run_dirs if (rd / fname).exists()]
        if not files:
            continue
        lst = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
        con.execute(
            f'CREATE VIEW "{view}" AS SELECT * EXCLUDE (filename), '
            "regexp_replace(filename, '/[^/]*$', '') AS run_dir "
            f"FROM read_parquet({lst}, union_by_name=true, filename=true)"
        )
        made.append(view)
    return made


def run_query(run_dirs: list[Path], sql: str):
    """Run ``sql`` over the views of :func:`query_views`; returns a pandas DataFrame."""
    import duckdb

    from medmap.errors import MedmapError

    con = duckdb.connect()
    try:
        views = query_views(con, [Path(r) for r in run_dirs])
        try:
            return con.execute(sql).df()
        except duckdb.Error as e:
            msg = str(e).splitlines()[0]
            raise MedmapError(f"query failed: {msg}", hint=f"views: {', '.join(views)}") from None
    finally:
        con.close()


def query_cmd(
    args: Annotated[
        list[str] | None,
        typer.Argument(help="RUN_DIR... followed by the SQL query", show_default=False),
    ] = None,
    fmt: Annotated[
        Format, typer.Option("--format", "-f", help="table | csv | json")
    ] = Format.table,
) -> None:
    """SQL (DuckDB) over runs: views results, coords, map, findings (union of the runs)."""
    import sys

    from rich.table import Table
    from rich.text import Text

    from medmap.errors import MedmapError

    if not args or len(args) < 2:
        raise MedmapError("query needs at least one RUN_DIR and a SQL string")
    df = run_query([Path(a) for a in args[:-1]], args[-1])
    if fmt == Format.csv:
        sys.stdout.write(df.to_csv(index=False))
    elif fmt == Format.json:
        sys.stdout.write(df.to_json(orient="records", indent=1) + "\n")
    else:
        table = Table(show_lines=False)
        for c in df.columns:
            table.add_column(Text(str(c)), overflow="fold")
        for row in df.itertuples(index=False):
            table.add_row(*[Text(_cell(v)) for v in row])
        console.print(table)
        console.print(f"{len(df)} rows")


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
    app.command("compare")(compare_cmd)
    app.command("query")(query_cmd)
