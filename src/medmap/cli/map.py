"""``medmap map``: the main job (every technique × every concept set for one model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medmap.cli.options import DeviceMapOpt, DtypeOpt

console = Console()


def map_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory (resumable)")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="alias, local dir, .gguf or cached hub id")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML run config")] = None,
    preset: Annotated[str | None, typer.Option(help="quick | standard | full")] = None,
    concepts: Annotated[
        str | None, typer.Option(help="comma-separated concept sets (default: all)")
    ] = None,
    techniques: Annotated[
        str | None,
        typer.Option(help="comma-separated: knows,umap,saliency,lesion,patching,logit_lens"),
    ] = None,
    known_only: Annotated[
        bool | None,
        typer.Option(
            "--known-only/--all-items",
            help="causal techniques on the targets the model knows (default) or on every item",
        ),
    ] = None,
    max_items: Annotated[int | None, typer.Option(help="items per concept set")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="skip report.html")] = False,
    ray: Annotated[
        str | None,
        typer.Option("--ray", help="run cells as Ray tasks: 'local', 'auto' or ray://host:port"),
    ] = None,
) -> None:
    """Build the knowledge map of one model: every technique over every concept set."""
    from medmap.run.config import build_config
    from medmap.run.outputs import check_out_dir
    from medmap.run.runner import run_map

    check_out_dir(out)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None
    cfg = build_config(
        preset_name=preset or (None if config else "quick"),
        config_file=config,
        model=model,
        concept_sets=split(concepts),
        techniques=split(techniques),
        known_only=known_only,
        max_items=max_items,
        seed=seed,
        dtype=dtype,
        device_map=device_map,
    )
    path = run_map(cfg, out, report=not no_report, ray_address=ray)
    console.print(
        f"[bold green]done[/]: {path}/results.parquet"
        + ("" if no_report else f", {path}/report.html")
    )


def sweep_cmd(
    sweep_file: Annotated[
        Path, typer.Argument(help="sweep TOML: [sweep] models = [...], out = DIR")
    ],
    ray: Annotated[
        str, typer.Option("--ray", help="'local', 'auto', ray://host:port, or 'none'")
    ] = "local",
    no_report: Annotated[bool, typer.Option("--no-report")] = False,
) -> None:
    """Map several models: every (model × technique × concept set) cell as a Ray task."""
    from medmap.run.runner import sweep

    paths = sweep(sweep_file, ray_address=None if ray == "none" else ray, report=not no_report)
    for p in paths:
        console.print(f"[bold green]done[/]: {p}")


def register(app: typer.Typer) -> None:
    app.command("map")(map_cmd)
    app.command("sweep")(sweep_cmd)
