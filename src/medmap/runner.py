"""``medmap map``: run every technique over every concept set for one model, resumably.

Work is split into cells (stage × concept set); each finished cell is a Parquet part in the run
directory, so an interrupted run continues where it stopped and ends with the same table.
Stages: ``umap`` (representation maps, also stores activations and UMAP coordinates),
``saliency``, ``lesion``, ``patching``; then the merged ``results.parquet``, the knowledge map,
``manifest.json`` and ``report.html``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import platform
import socket
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from medmap.config import RunConfig
from medmap.errors import MedmapError
from medmap.results import COLUMNS, normalize, write_parquet_atomic
from medmap.rundir import RunDir, RunLock, write_json_atomic

console = Console(stderr=True)
STAGES = ("umap", "saliency", "lesion", "patching")
_VERSIONED = (
    "medmap",
    "torch",
    "transformers",
    "numpy",
    "scikit-learn",
    "umap-learn",
    "pandas",
    "accelerate",
)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _host() -> dict[str, Any]:
    import os

    import torch

    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count(),
    }


def concept_sets_for(config: RunConfig) -> list[str]:
    """The concept sets a run covers, validated against the library."""
    from medmap.concepts import list_concepts

    available = list_concepts()
    names = config.concept_sets or available
    for n in names:
        if n not in available and not Path(n).exists():
            raise MedmapError(
                f"unknown concept set {n!r}",
                hint=f"bundled sets: {', '.join(available)}; or a path to a file",
            )
    return list(names)


def cell_id(spec: str) -> str:
    """File-name-safe id of a concept-set spec: the bundled name, or ``<stem>-<hash>`` of a path."""
    import hashlib
    import re

    if re.fullmatch(r"[a-z0-9_]+", spec):
        return spec
    p = Path(spec).expanduser().resolve()
    stem = re.sub(r"[^a-z0-9_]", "_", p.stem.lower())
    return f"{stem}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"


def _load_set(name: str, config: RunConfig, stage: str = "lesion"):
    """The concept set of a cell, subset to the stage's item budget (stratified, seeded)."""
    from medmap.concepts import load_concepts

    cs = load_concepts(name)
    cap = config.max_items
    if stage == "umap" and config.umap_max_items is not None:
        cap = config.umap_max_items
    if cap is not None and len(cs.items) > cap:
        cs = cs.subset(cap, seed=config.seed)
    return cs


def _trim_targets(cs, config: RunConfig):
    """Keep the first ``config.max_targets`` targets of each item (saliency and lesioning)."""
    if config.max_targets is None:
        return cs
    k = config.max_targets
    return cs.model_copy(
        update={"items": [it.model_copy(update={"targets": it.targets[:k]}) for it in cs.items]}
    )


def _stage_umap(model, cs, config: RunConfig, run: RunDir) -> pd.DataFrame:
    from medmap.represent import representation_map

    res = representation_map(
        model,
        cs,
        position=config.position,
        seed=config.seed,
        n_boot=config.n_boot,
        umap=config.umap,
        batch_size=config.batch_size,
        max_templates=config.max_templates,
        progress=True,
        store_dir=run.path / "activations" / cs.name,
    )
    coords = res.coords.copy()
    coords.insert(0, "concept_set", cs.name)
    write_parquet_atomic(coords, run.path / "parts" / "umap_coords" / f"{cs.name}.parquet")
    return res.table


def _stage_saliency(model, cs, config: RunConfig, run: RunDir) -> pd.DataFrame:
    from medmap.causal import weight_saliency_concepts

    return weight_saliency_concepts(
        model,
        _trim_targets(cs, config),
        max_items=config.saliency_items,
        n_boot=config.n_boot,
        seed=config.seed,
        progress=True,
    )


def _stage_lesion(model, cs, config: RunConfig, run: RunDir) -> pd.DataFrame:
    from medmap.causal import lesion_concepts

    return lesion_concepts(
        model,
        _trim_targets(cs, config),
        window=config.lesion_window,
        batch_size=config.batch_size,
        n_boot=config.n_boot,
        seed=config.seed,
        progress=True,
        cache_dir=run.path / "cells" / "lesion" / cs.name,
    )


def _stage_patching(model, cs, config: RunConfig, run: RunDir) -> pd.DataFrame:
    from medmap.causal import patch_concepts
    from medmap.causal.patching import NoPairsError

    try:
        return patch_concepts(
            model,
            cs,
            positions=list(config.patch_positions),
            max_pairs=config.max_pairs,
            batch_size=config.batch_size,
            n_boot=config.n_boot,
            seed=config.seed,
            progress=True,
            cache_dir=run.path / "cells" / "patching" / cs.name,
        )
    except NoPairsError as e:
        # One set without pairs must not sink a whole map: record nothing and say why.
        console.print(f"[yellow]patching skipped for {cs.name}:[/] {e}")
        return pd.DataFrame(columns=COLUMNS)


_STAGE_FNS = {
    "umap": _stage_umap,
    "saliency": _stage_saliency,
    "lesion": _stage_lesion,
    "patching": _stage_patching,
}


_MODELS: dict[str, Any] = {}


def _model_for(config: RunConfig):
    """Load the run's model once per process (Ray workers reuse it across their cells)."""
    from medmap.loading import load_model

    key = json.dumps(
        [config.model, config.dtype, config.device, config.device_map, config.max_memory],
        default=str,
    )
    if key not in _MODELS:
        _MODELS.clear()  # one model per process keeps memory bounded
        _MODELS[key] = load_model(
            config.model,
            dtype=config.dtype,
            device=config.device,
            device_map=config.device_map,
            max_memory=config.max_memory,
            allow_pickle=config.allow_pickle,
            trust_remote_code=config.trust_remote_code,
        )
    return _MODELS[key]


def run_cell(config: RunConfig, out: str | Path, stage: str, name: str) -> str:
    """Compute one (stage, concept set) cell and write it atomically; skip it if finished."""
    run = RunDir(out)
    cell = cell_id(name)
    if run.done(stage, cell):
        return "skipped"
    model = _model_for(config)
    cs = _load_set(name, config, stage)
    t0 = time.perf_counter()
    df = _STAGE_FNS[stage](model, cs, config, run)
    df = normalize(df.assign(model=model.name, concept_set=cs.name))
    run.write_cell(stage, cell, df, time.perf_counter() - t0)
    return "done"


def plan_cells(config: RunConfig) -> list[tuple[str, str]]:
    """Every (stage, concept set) cell of a run, in the fixed merge order."""
    sets = concept_sets_for(config)
    return [(stage, name) for stage in STAGES if stage in config.techniques for name in sets]


def preflight(cfg: RunConfig, *, load: bool) -> None:
    """Check concept sets and model before ``run_map`` creates the run directory.

    A bad model or concept file then fails in seconds and leaves nothing behind (a fresh run
    directory would keep the failed run's config.json and refuse the corrected command as "a
    different config"). With ``load`` the model is loaded through the runner's per-process cache,
    so it is loaded only once; otherwise (Ray workers load it) only its spec is checked.
    """
    from medmap.causal.concept_io import concept_targets
    from medmap.concepts import load_concepts
    from medmap.loading import resolve_dtype, resolve_spec

    for name in concept_sets_for(cfg):
        cs = load_concepts(name)
        n_items = min(len(cs.items), cfg.max_items or len(cs.items))
        if "umap" in cfg.techniques and n_items < 3:
            raise MedmapError(
                f"concept set {cs.name!r} has {n_items} items; representation maps need at least 3",
                hint="add items (or raise max_items), or leave umap out of --techniques",
            )
        if set(cfg.techniques) - {"umap"}:
            concept_targets(cs)  # saliency, lesioning and patching need targets
    resolve_spec(cfg.model, cfg.allow_pickle)
    resolve_dtype(cfg.dtype)
    if load:
        _model_for(cfg)


def run_map(
    config: RunConfig, out: str | Path, *, report: bool = True, ray_address: str | None = None
) -> Path:
    """Run (or resume) a knowledge-map run of ``config.model`` into ``out``; return ``out``.

    Cells already finished in ``out`` are skipped; the final table is identical to an
    uninterrupted run with the same config. With ``ray_address`` (``"auto"``, ``"local"`` or
    ``ray://host:port``) the cells run as Ray tasks (see :mod:`medmap.distributed`).
    """
    preflight(config, load=ray_address is None)  # fail before anything is written
    run = RunDir(out)
    cfg = config.model_dump(mode="json")
    run.prepare(cfg)
    started = _first_start(run, dt.datetime.now(dt.UTC).isoformat())
    with RunLock(run.path):
        run.remove_orphans()
        cells = plan_cells(config)
        todo = [(st, n) for st, n in cells if not run.done(st, cell_id(n))]
        console.print(
            f"[bold]medmap map[/] {config.model}: {len(cells)} cells, "
            f"{len(cells) - len(todo)} already done → {run.path}"
        )
        if ray_address is not None:
            from medmap.distributed import run_cells_on_ray

            run_cells_on_ray([(config, run.path, stage, name) for stage, name in todo], ray_address)
        else:
            for i, (stage, name) in enumerate(todo, 1):
                console.print(f"[bold cyan]({i}/{len(todo)}) {stage}[/] · {name}")
                run_cell(config, run.path, stage, name)
        finish_run(config, run, cells, started, report=report)
    return run.path


def finish_run(
    config: RunConfig, run: RunDir, cells: list[tuple[str, str]], started: str, *, report: bool
) -> None:
    """Merge finished cells into results.parquet and umap_coords.parquet; write manifest, report."""
    from medmap.loading import load_model

    sets = list(dict.fromkeys(name for _, name in cells))
    table = merge_results(run, cells)
    write_parquet_atomic(table, run.path / "results.parquet")
    coords = sorted((run.path / "parts" / "umap_coords").glob("*.parquet"))
    coords = [pd.read_parquet(p) for p in coords]
    if coords:
        write_parquet_atomic(merge_coords(coords), run.path / "umap_coords.parquet")
    model = _MODELS.get(next(iter(_MODELS), None)) if _MODELS else None
    if model is None:  # Ray ran the cells: read the model's metadata without keeping it
        model = load_model(
            config.model,
            allow_pickle=config.allow_pickle,
            trust_remote_code=config.trust_remote_code,
        )
    manifest = {
        "model": model.name,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "weights_hash": model.weights_hash,
        "weights_source": model.source,
        "config": config.model_dump(mode="json"),
        "concept_sets": sets,
        "seeds": {"seed": config.seed},
        "started": started,
        "finished": dt.datetime.now(dt.UTC).isoformat(),
        "stages": run.stage_seconds(),
        "host": _host(),
        "versions": _versions(),
        "rows": len(table),
    }
    write_json_atomic(run.path / "manifest.json", manifest)
    if report:
        from medmap.report.html import build_report

        build_report(run.path)


def _first_start(run: RunDir, now: str) -> str:
    mf = run.path / "manifest.json"
    if mf.exists():
        return json.loads(mf.read_text()).get("started", now)
    marker = run.path / "parts" / "started.txt"
    if marker.exists():
        return marker.read_text().strip()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(now)
    return now


def merge_coords(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-set UMAP coordinates. A label column that is numeric in one set and text
    in another (``decade`` 4 vs ``"1940s"``) becomes text, so the file has one type per column."""
    kinds: dict[str, set[bool]] = {}
    for f in frames:
        for c in f.columns:
            kinds.setdefault(c, set()).add(pd.api.types.is_numeric_dtype(f[c]))
    mixed = [c for c, k in kinds.items() if len(k) > 1]
    if mixed:
        frames = [f.astype({c: "string" for c in mixed if c in f.columns}) for f in frames]
    return pd.concat(frames, ignore_index=True)


def merge_results(run: RunDir, cells: list[tuple[str, str]]) -> pd.DataFrame:
    """Concatenate finished cells in a fixed order (stage, then concept set)."""
    ids = [(stage, cell_id(name)) for stage, name in cells]
    frames = [run.read_cell(stage, c) for stage, c in ids if run.done(stage, c)]
    if not frames:
        raise MedmapError("no results were produced")
    # Cells from different stages carry different extra columns; concat keeps them all.
    return normalize(pd.concat(frames, ignore_index=True))
