"""CLI of the concept library: ``medmap concepts list|show|validate|pairs`` and ``medmap knows``."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medmap.cli.options import BatchOpt, ModelOpt, SeedOpt

console = Console()
err = Console(stderr=True)
concepts_app = typer.Typer(help="List, show and validate concept sets.", no_args_is_help=True)


class Fmt(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def _item_rows(cs) -> list[dict]:
    rows = []
    for it in cs.items:
        row = {"id": it.id, "concept": it.concept}
        row.update({f"label:{k}": v for k, v in it.labels.items()})
        row["targets"] = len(it.targets)
        row["source"] = it.source
        rows.append(row)
    return rows


@concepts_app.command("list")
def list_cmd() -> None:
    """The bundled concept sets with their size, labels and whether they are medical."""
    from medmap.concepts import list_concepts, load_concepts

    t = Table("name", "family", "medical", "items", "prompts", "targets", "labels")
    for col in t.columns[:6]:
        col.no_wrap = True
    for name in list_concepts():
        cs = load_concepts(name)
        t.add_row(
            name,
            cs.family,
            "yes" if cs.medical else f"no ({cs.control_for})",
            str(len(cs.items)),
            str(sum(1 for _ in cs.render())),
            str(sum(1 for _ in cs.targets())),
            ", ".join(f"{k} ({v.kind})" for k, v in cs.labels.items()),
        )
    console.print(t)


@concepts_app.command("show")
def show_cmd(
    name: Annotated[str, typer.Argument(help="bundled set name or a .yaml/.csv path")],
    fmt: Annotated[Fmt, typer.Option("--format", "-f")] = Fmt.table,
) -> None:
    """Print a concept set's items (table), or the whole set as CSV or JSON."""
    import pandas as pd

    from medmap.concepts import load_concepts

    cs = load_concepts(name)
    if fmt == Fmt.json:
        sys.stdout.write(json.dumps(cs.model_dump(), indent=2, ensure_ascii=False) + "\n")
        return
    df = pd.DataFrame(_item_rows(cs))
    if fmt == Fmt.csv:
        df.to_csv(sys.stdout, index=False)
        return
    t = Table(*df.columns, title=f"{cs.name} v{cs.version}: {cs.description}")
    for row in df.itertuples(index=False):
        t.add_row(*(str(v) for v in row))
    console.print(t)


@concepts_app.command("validate")
def validate_cmd(
    path: Annotated[Path, typer.Argument(help="a .yaml or .csv concept file")],
) -> None:
    """Validate a concept file; prints a summary, or the first problem (file, line, field)."""
    from medmap.concepts import load_file

    cs = load_file(path)
    console.print(
        f"[green]ok[/] {path}: set {cs.name!r}, {len(cs.items)} items, "
        f"{sum(1 for _ in cs.render())} prompts, {sum(1 for _ in cs.targets())} targets, "
        f"labels: {', '.join(cs.labels) or 'none'}"
    )


@concepts_app.command("pairs")
def pairs_cmd(
    names: Annotated[list[str], typer.Argument(help="concept sets (default: all bundled)")] = None,
    model: Annotated[str, typer.Option("--model", "-m")] = "smollm2-135m",
) -> None:
    """How many counterfactual pairs exist per set and how many survive the model's tokenizer."""
    from medmap.concepts import list_concepts, load_concepts, pair_survival
    from medmap.model.loading import load_tokenizer

    tok = load_tokenizer(model)
    t = Table("set", "candidate pairs", "kept pairs", "kept %", title=f"tokenizer: {model}")
    for name in names or list_concepts():
        s = pair_survival(load_concepts(name), tok)
        pct = 100 * s["same_length"] / max(s["candidates"], 1)
        t.add_row(name, str(s["candidates"]), str(s["same_length"]), f"{pct:.0f}")
    console.print(t)


def knows_cmd(
    model: ModelOpt,
    concepts: Annotated[
        list[str] | None, typer.Option("--concepts", "-c", help="set name or file (repeatable)")
    ] = None,
    k: Annotated[
        int, typer.Option("--k", min=1, help="extra column: first answer token in the top k")
    ] = 10,
    max_items: Annotated[int | None, typer.Option("--max-items", min=1)] = None,
    max_distractors: Annotated[
        int, typer.Option("--max-distractors", min=1, help="distractors per target (seeded cap)")
    ] = 4,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write rows to Parquet")] = None,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 32,
) -> None:
    """Forced choice per item: does the best accepted answer beat every distractor (other items'
    answers)? Fraction known per set beside its chance level and the moved-answer control."""
    import pandas as pd

    from medmap.concepts import list_concepts, load_concepts
    from medmap.model.loading import load_model
    from medmap.techniques.knowledge import known_fraction, knows

    sets = [load_concepts(c) for c in (concepts or list_concepts())]
    m = load_model(model)
    frames = []
    for cs in sets:
        frames.append(
            knows(
                m,
                cs,
                k=k,
                max_items=max_items,
                max_distractors=max_distractors,
                seed=seed,
                batch_size=batch_size,
                progress=True,
            )
        )
    df = pd.concat(frames, ignore_index=True)
    if out is not None:
        from medmap.analysis.results import write_parquet_atomic

        write_parquet_atomic(df, out)
        err.print(f"[green]wrote[/] {out} ({len(df)} rows)")
    t = Table(
        "set", "targets", "known", "chance", "moved answers", "known (per token)",
        f"first token in top {k}", title=f"{m.name}: forced choice",
    )  # fmt: skip
    for row in known_fraction(df).itertuples(index=False):
        first = df.loc[df.concept_set == row.concept_set, "first_token_known"].mean()
        t.add_row(
            row.concept_set,
            str(row.n),
            f"{row.known:.0%}",
            f"{row.chance:.0%}",
            f"{row.control:.0%}",
            f"{row.known_norm:.0%}",
            f"{first:.0%}",
        )
    console.print(t)


def register(app: typer.Typer) -> None:
    """Add ``concepts`` and ``knows`` to the ``medmap`` command line."""
    app.add_typer(concepts_app, name="concepts")
    app.command("knows")(knows_cmd)
