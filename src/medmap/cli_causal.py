"""CLI commands of the causal techniques: ``medmap saliency``, ``medmap lesion``, ``medmap patch``.

Each writes ``DIR/results.parquet`` (tidy rows, :mod:`medmap.results`) and ``DIR/items.parquet``
(per-item / per-pair detail), and keeps resumable cells in ``DIR/cells`` so an interrupted
command run again with the same options continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
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


def _load(model: str, concepts: str, dtype: str | None, device_map: str | None):
    from medmap.concepts import load_concepts
    from medmap.loading import load_model

    cs = load_concepts(concepts)
    return load_model(model, dtype=dtype, device_map=device_map), cs


def _write(out: Path, tidy, items) -> None:
    from medmap.results import write_parquet_atomic

    write_parquet_atomic(tidy, out / "results.parquet")
    write_parquet_atomic(items, out / "items.parquet")
    console.print(f"[green]wrote[/] {out / 'results.parquet'} ({len(tidy)} rows) and items.parquet")


def _check_out(out: Path) -> None:
    from medmap.outputs import check_out_dir

    check_out_dir(out)


def saliency(
    model: ModelOpt,
    concepts: ConceptsOpt,
    out: OutOpt,
    max_items: Annotated[int | None, typer.Option("--max-items", min=1)] = None,
    batch_size: BatchOpt = 8,
    n_boot: BootOpt = 200,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Weight-gradient saliency of a concept set's target completions per block and sub-module."""
    from medmap.causal.concept_io import concept_targets, set_name
    from medmap.causal.saliency import saliency_items, saliency_summary

    _check_out(out)
    m, cs = _load(model, concepts, dtype, device_map)
    ct = concept_targets(cs, max_items)
    items = saliency_items(
        m,
        ct.prompts,
        ct.targets,
        concept_set=set_name(cs),
        item_ids=ct.ids,
        batch_size=batch_size,
        progress=True,
        cache_dir=out / "cells",
    )
    _write(out, saliency_summary(items, n_boot=n_boot, seed=seed), items)


def lesion(
    model: ModelOpt,
    concepts: ConceptsOpt,
    out: OutOpt,
    window: Annotated[int, typer.Option("--window", min=1, help="consecutive blocks removed")] = 1,
    max_items: Annotated[int | None, typer.Option("--max-items", min=1)] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="top-k accuracy")] = 5,
    batch_size: BatchOpt = 8,
    n_boot: BootOpt = 200,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Remove each block (or window of blocks) and measure the damage to target completions."""
    from medmap.causal.concept_io import concept_targets, set_name
    from medmap.causal.lesion import lesion as run_lesion
    from medmap.causal.lesion import lesion_summary

    _check_out(out)
    m, cs = _load(model, concepts, dtype, device_map)
    ct = concept_targets(cs, max_items)
    items = run_lesion(
        m,
        ct.prompts,
        ct.targets,
        None,
        window,
        k=k,
        batch_size=batch_size,
        concept_set=set_name(cs),
        item_ids=ct.ids,
        progress=True,
        cache_dir=out / "cells",
    )
    _write(out, lesion_summary(items, n_boot=n_boot, seed=seed), items)


def patch(
    model: ModelOpt,
    concepts: ConceptsOpt,
    out: OutOpt,
    positions: Annotated[
        str, typer.Option("--positions", help="comma-separated: last, concept, all")
    ] = "last,concept",
    max_pairs: Annotated[int, typer.Option("--max-pairs", min=1)] = 32,
    direction: Annotated[str, typer.Option("--direction", help="denoise or noise")] = "denoise",
    batch_size: BatchOpt = 8,
    n_boot: BootOpt = 200,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Activation patching between counterfactual pairs of a concept set, per layer and position."""
    from medmap.causal.patching import POSITIONS, concept_pairs, patch_summary
    from medmap.causal.patching import patch as run_patch

    _check_out(out)
    pos = [p.strip() for p in positions.split(",") if p.strip()]
    bad = [p for p in pos if p not in POSITIONS]
    if bad or not pos:  # checked before the model loads
        raise MedmapError(
            f"unknown patch position {bad[0] if bad else positions!r}",
            hint=f"use --positions with one or more of {', '.join(POSITIONS)}",
        )
    if direction not in ("denoise", "noise"):
        raise MedmapError(f"unknown direction {direction!r}", hint="use denoise or noise")
    m, cs = _load(model, concepts, dtype, device_map)
    pairs = concept_pairs(m, cs, max_pairs=max_pairs, seed=seed)
    items = run_patch(
        m,
        positions=pos,
        batch_size=batch_size,
        direction=direction,
        concept_set=str(getattr(cs, "name", "custom")),
        progress=True,
        cache_dir=out / "cells",
        **pairs,
    )
    _write(out, patch_summary(items, n_boot=n_boot, seed=seed), items)


def register(app: typer.Typer) -> None:
    """Add ``saliency``, ``lesion`` and ``patch`` to the ``medmap`` command line."""
    app.command("saliency")(saliency)
    app.command("lesion")(lesion)
    app.command("patch")(patch)
