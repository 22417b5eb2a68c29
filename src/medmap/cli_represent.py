"""``medmap umap``: representation map (UMAP, cluster/probe scores, detectors) of one concept set."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from medmap.cli_options import (
    BatchOpt,
    BootOpt,
    ConceptsOpt,
    DeviceMapOpt,
    DtypeOpt,
    ModelOpt,
    OutOpt,
    SeedOpt,
)
from medmap.errors import MedmapError

console = Console(stderr=True)


def umap_cmd(
    model: ModelOpt,
    concepts: ConceptsOpt,
    out: OutOpt,
    position: Annotated[str, typer.Option(help="concept | last")] = "concept",
    max_items: Annotated[
        int | None, typer.Option("--max-items", min=3, help="items of the set (stratified)")
    ] = None,
    max_templates: Annotated[
        int | None, typer.Option("--max-templates", min=1, help="templates per item")
    ] = None,
    seed: SeedOpt = 0,
    n_boot: BootOpt = 200,
    no_umap: Annotated[bool, typer.Option("--no-umap", help="scores only, no UMAP")] = False,
    batch_size: BatchOpt = 16,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Per-layer UMAP and cluster/probe/detector scores; writes results.parquet, umap_coords.parquet."""
    if position not in ("concept", "last"):
        raise MedmapError(f"unknown position {position!r}", hint="use concept or last")
    from medmap.outputs import check_out_dir

    check_out_dir(out)
    from medmap.concepts import load_concepts
    from medmap.loading import load_model
    from medmap.represent import representation_map
    from medmap.results import write_parquet_atomic

    cs = load_concepts(concepts)
    m = load_model(model, dtype=dtype, device_map=device_map)
    res = representation_map(
        m,
        cs,
        position=position,
        seed=seed,
        max_items=max_items,
        max_templates=max_templates,
        n_boot=n_boot,
        umap=not no_umap,
        batch_size=batch_size,
        progress=True,
    )
    write_parquet_atomic(res.table, out / "results.parquet")
    coords = res.coords.copy()
    if len(coords):
        coords.insert(0, "concept_set", cs.name)
        coords.insert(0, "model", m.name)
    write_parquet_atomic(coords, out / "umap_coords.parquet")
    console.print(
        f"[bold green]done[/]: {out}/results.parquet ({len(res.table)} rows), "
        f"{out}/umap_coords.parquet ({len(coords)} rows)"
    )


def register(app: typer.Typer) -> None:
    app.command("umap")(umap_cmd)
