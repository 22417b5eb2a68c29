"""CLI commands of the causal techniques: ``medmap saliency``, ``medmap lesion``, ``medmap patch``.

Each is ``medmap map`` restricted to one technique and one concept set
(:func:`medmap.run.runner.run_technique`): it writes a run directory with lock, ``config.json``
and ``manifest.json``, ``DIR/results.parquet`` (tidy rows, :mod:`medmap.analysis.results`) and
``DIR/items.parquet`` (per-item / per-pair detail), and keeps resumable cells under ``DIR/cells``
so an interrupted command run again with the same options continues where it stopped.
``--max-items`` is a stratified subset of the set, as everywhere.
"""

from __future__ import annotations

from pathlib import Path
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

KnownOpt = Annotated[
    bool,
    typer.Option(
        "--known-only/--all-items",
        help="score every item first (forced choice) and keep only the targets the model knows "
        "(as `medmap map` does); default: every item",
    ),
]


def _dtype_name(dtype: str | None) -> str | None:
    """The config's name of a ``--dtype`` (aliases such as ``bf16`` accepted; bad ones raise)."""
    import torch

    from medmap.model.loading import resolve_dtype

    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    resolved = resolve_dtype(dtype)
    return None if resolved is None else names.get(resolved, str(dtype))


def run_single(technique: str, out: Path, **settings) -> None:
    """Run one technique over one concept set as a run directory (see
    :func:`medmap.run.runner.run_technique`): lock, config, manifest, ``results.parquet`` and
    ``items.parquet``; an interrupted command run again with the same options resumes."""
    from medmap.run.config import build_config
    from medmap.run.outputs import check_out_dir
    from medmap.run.runner import run_technique

    check_out_dir(out)
    concepts = settings.pop("concepts")
    settings["dtype"] = _dtype_name(settings.get("dtype"))
    cfg = build_config(concept_sets=[concepts], techniques=[technique], **settings)
    path = run_technique(cfg, out, technique)
    n = len(_read(path / "results.parquet"))
    extra = " and items.parquet" if (path / "items.parquet").exists() else ""
    console.print(f"[green]wrote[/] {path / 'results.parquet'} ({n} rows){extra}")


def _check_out(out: Path) -> None:
    from medmap.run.outputs import check_out_dir

    check_out_dir(out)


def _read(path: Path):
    import pandas as pd

    return pd.read_parquet(path)


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
    known_only: KnownOpt = False,
) -> None:
    """Weight-gradient saliency of a concept set's target completions per block and sub-module."""
    run_single(
        "saliency", out, model=model, concepts=concepts, max_items=max_items,
        batch_size=batch_size, n_boot=n_boot, seed=seed, dtype=dtype, device_map=device_map,
        known_only=known_only,
    )  # fmt: skip


SiteOpt = Annotated[
    str,
    typer.Option(
        "--site", help="comma-separated: block (whole block / residual stream), attn, mlp"
    ),
]


def _sites(site: str) -> list[str]:
    """``--site`` as a list, checked before the model loads."""
    sites = [s.strip() for s in site.split(",") if s.strip()]
    bad = [s for s in sites if s not in ("block", "attn", "mlp")]
    if bad or not sites:
        raise MedmapError(
            f"unknown site {bad[0] if bad else site!r}",
            hint="use --site with one or more of block, attn, mlp",
        )
    return list(dict.fromkeys(sites))


def lesion(
    model: ModelOpt,
    concepts: ConceptsOpt,
    out: OutOpt,
    window: Annotated[int, typer.Option("--window", min=1, help="consecutive blocks removed")] = 1,
    site: SiteOpt = "block",
    max_items: Annotated[int | None, typer.Option("--max-items", min=1)] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="top-k accuracy")] = 5,
    batch_size: BatchOpt = 8,
    n_boot: BootOpt = 200,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    known_only: KnownOpt = False,
) -> None:
    """Remove each block (or window of blocks) and measure the damage to target completions.

    ``--site attn`` / ``--site mlp`` zero that sub-module's output instead of removing the block.
    """
    sites = _sites(site)
    run_single(
        "lesion", out, model=model, concepts=concepts, lesion_window=window, lesion_k=k,
        lesion_sites=sites,
        max_items=max_items, batch_size=batch_size, n_boot=n_boot, seed=seed, dtype=dtype,
        device_map=device_map, known_only=known_only,
    )  # fmt: skip


def patch(
    model: ModelOpt,
    concepts: ConceptsOpt,
    out: OutOpt,
    positions: Annotated[
        str, typer.Option("--positions", help="comma-separated: last, concept, all")
    ] = "last,concept",
    max_pairs: Annotated[int, typer.Option("--max-pairs", min=1)] = 32,
    direction: Annotated[str, typer.Option("--direction", help="denoise or noise")] = "denoise",
    site: SiteOpt = "block",
    batch_size: BatchOpt = 8,
    n_boot: BootOpt = 200,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    known_only: KnownOpt = False,
) -> None:
    """Activation patching between counterfactual pairs of a concept set, per layer and position.

    ``--site attn`` / ``--site mlp`` patch that sub-module's output instead of the residual stream.
    """
    from medmap.techniques.patching import POSITIONS

    _check_out(out)
    sites = _sites(site)
    pos = [p.strip() for p in positions.split(",") if p.strip()]
    bad = [p for p in pos if p not in POSITIONS]
    if bad or not pos:  # checked before the model loads
        raise MedmapError(
            f"unknown patch position {bad[0] if bad else positions!r}",
            hint=f"use --positions with one or more of {', '.join(POSITIONS)}",
        )
    if direction not in ("denoise", "noise"):
        raise MedmapError(f"unknown direction {direction!r}", hint="use denoise or noise")
    run_single(
        "patching", out, model=model, concepts=concepts, patch_positions=pos,
        patch_direction=direction, patch_sites=sites, max_pairs=max_pairs, batch_size=batch_size, n_boot=n_boot,
        seed=seed, dtype=dtype, device_map=device_map, known_only=known_only,
    )  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add ``saliency``, ``lesion`` and ``patch`` to the ``medmap`` command line."""
    app.command("saliency")(saliency)
    app.command("lesion")(lesion)
    app.command("patch")(patch)
