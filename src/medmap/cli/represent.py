"""``medmap umap``: representation map (UMAP, cluster/probe scores, detectors) of one concept set.

``medmap map`` restricted to the ``umap`` technique and one set: a run directory with lock and
manifest, ``results.parquet``, ``umap_coords.parquet`` and the activation store.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from medmap.cli.options import (
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
    from medmap.cli.causal import run_single

    run_single(
        "umap", out, model=model, concepts=concepts, position=position, max_items=max_items,
        max_templates=max_templates, seed=seed, n_boot=n_boot, umap=not no_umap,
        batch_size=batch_size, dtype=dtype, device_map=device_map,
    )  # fmt: skip
    console.print(f"[bold green]done[/]: {out}/results.parquet, {out}/umap_coords.parquet")


def register(app: typer.Typer) -> None:
    app.command("umap")(umap_cmd)
