"""``medmap map``: run every technique over every concept set for one model, resumably.

Work is split into cells (technique × concept set, :mod:`medmap.techniques.base`); each finished
cell is a Parquet part in the run directory (:class:`medmap.run.rundir.Run`), so an interrupted
run continues where it stopped and ends with the same table. Techniques, in merge order:
``umap`` (representation maps, also stores activations and UMAP coordinates), ``saliency``,
``lesion``, ``patching``; then the merged ``results.parquet``, ``manifest.json``, the knowledge
map and findings (:func:`medmap.analysis.maps.build_outputs`) and ``report.html``.

The single-technique commands (``medmap umap|saliency|lesion|patch``) are this runner restricted
to one technique (:func:`run_technique`). Cells run in this process or as Ray tasks
(:mod:`medmap.run.ray`); both call :func:`medmap.run.execute.run_cell`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import platform
import shutil
import socket
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from medmap.analysis.results import normalize
from medmap.errors import MedmapError
from medmap.run.config import RunConfig
from medmap.run.execute import (  # noqa: F401  (cell_id, concept_sets_for: the runner's API)
    cell_id,
    concept_sets_for,
    context,
    loaded_model,
    model_for,
    model_info,
    plan_cells,
    run_cell,
)
from medmap.run.outputs import write_json_atomic, write_parquet_atomic, write_text_atomic
from medmap.run.rundir import Run, RunDir, RunLock  # noqa: F401  (re-exported)
from medmap.techniques.base import get_technique, technique_names

console = Console(stderr=True)
STAGES = tuple(technique_names())
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


def preflight(cfg: RunConfig, *, load: bool) -> None:
    """Check concept sets and model before ``run_map`` creates the run directory.

    A bad model or concept file then fails in seconds and leaves nothing behind (a fresh run
    directory would keep the failed run's config.json and refuse the corrected command as "a
    different config"). With ``load`` the model is loaded through the per-process cache, so it
    is loaded only once; otherwise (Ray workers load it) only its spec is checked.
    """
    from medmap.concepts import load_concepts
    from medmap.model.loading import resolve_dtype, resolve_spec
    from medmap.techniques.concept_io import concept_targets

    techniques = [get_technique(t) for t in cfg.techniques]
    for name in concept_sets_for(cfg):
        cs = load_concepts(name)
        for t in techniques:
            cap = t.item_budget(cfg)
            n_items = min(len(cs.items), cap or len(cs.items))
            if n_items < t.min_items:
                raise MedmapError(
                    f"concept set {cs.name!r} has {n_items} items; {t.title} need at least "
                    f"{t.min_items}",
                    hint=f"add items (or raise max_items), or leave {t.name} out of --techniques",
                )
        if any(t.needs_targets for t in techniques):
            concept_targets(cs)  # saliency, lesioning and patching need targets
    resolve_spec(cfg.model, cfg.allow_pickle)
    resolve_dtype(cfg.dtype)
    if load:
        model_for(cfg)


def run_map(
    config: RunConfig,
    out: str | Path,
    *,
    report: bool = True,
    ray_address: str | None = None,
    strict: bool = False,
    item_detail: bool = False,
) -> Path:
    """Run (or resume) a knowledge-map run of ``config.model`` into ``out``; return ``out``.

    Cells already finished in ``out`` are skipped; the final table is identical to an
    uninterrupted run with the same config. With ``ray_address`` (``"auto"``, ``"local"`` or
    ``ray://host:port``) the cells run as Ray tasks (see :mod:`medmap.run.ray`). ``strict`` and
    ``item_detail``: see :class:`medmap.techniques.base.RunContext`.

    A new run that fails with a :class:`MedmapError` before any cell is finished (bad input)
    leaves no run directory behind, so the corrected command starts afresh.
    """
    preflight(config, load=ray_address is None)  # fail before anything is written
    run = Run(out)
    existed = run.path.exists()
    fresh = not run.config_path.exists()
    run.prepare(config.model_dump(mode="json"))
    started = _first_start(run, dt.datetime.now(dt.UTC).isoformat())
    discarded = False
    try:
        with RunLock(run.path):
            try:
                _run_cells(config, run, ray_address, strict=strict, item_detail=item_detail)
                finish_run(config, run, plan_cells(config), started, report=report)
            except MedmapError:
                # only while holding the lock: never touch the files of another live run
                if fresh and not any(run.parts.glob("*/*.parquet")):
                    _discard(run)
                    discarded = True
                raise
    finally:
        if discarded and not existed:
            with contextlib.suppress(OSError):
                run.path.rmdir()
    return run.path


def _run_cells(
    config: RunConfig, run: Run, ray_address: str | None, *, strict: bool, item_detail: bool
) -> None:
    """Compute every unfinished cell of the run (call while holding its lock)."""
    run.remove_orphans()
    cells = plan_cells(config)
    todo = [(st, n) for st, n in cells if not run.done(st, cell_id(n))]
    console.print(
        f"[bold]medmap map[/] {config.model}: {len(cells)} cells, "
        f"{len(cells) - len(todo)} already done → {run.path}"
    )
    if ray_address is not None:
        from medmap.run.ray import run_cells_on_ray

        run_cells_on_ray([(config, run.path, st, n) for st, n in todo], ray_address)
        return
    for i, (stage, name) in enumerate(todo, 1):
        console.print(f"[bold cyan]({i}/{len(todo)}) {stage}[/] · {name}")
        run_cell(config, run.path, stage, name, strict=strict, item_detail=item_detail)


def run_technique(
    config: RunConfig, out: str | Path, technique: str, *, report: bool = False
) -> Path:
    """A single-technique command: :func:`run_map` restricted to ``technique``.

    Writes the same run directory as ``medmap map --techniques <technique>`` (lock, config,
    manifest, ``results.parquet``) plus ``items.parquet`` (per-item detail, where the technique
    has it); a set the technique cannot use is an error, not a skipped set.
    """
    # validated again, so a known-only causal technique brings its knows stage
    config = RunConfig(**{**config.model_dump(), "techniques": [technique]})
    return run_map(config, out, report=report, strict=True, item_detail=True)


def _discard(run: Run) -> None:
    """Remove what a failed new run wrote (only the run's own entries; its lock is released by
    the caller)."""
    for p in (run.config_path, run.model_info_path):
        p.unlink(missing_ok=True)
    for d in (run.parts, run.path / "cells", run.path / "activations"):
        shutil.rmtree(d, ignore_errors=True)


def _manifest_model(config: RunConfig, run: Run) -> dict[str, Any]:
    """The model's identity and shape: recorded by the cells (``model.json``), or from the model
    this process holds; only a run directory written before ``model.json`` existed loads it."""
    info = run.model_info()
    if info:
        return info
    model = loaded_model()
    if model is None:
        from medmap.model.loading import load_model

        model = load_model(
            config.model,
            allow_pickle=config.allow_pickle,
            trust_remote_code=config.trust_remote_code,
        )
    return model_info(model)


def finish_run(
    config: RunConfig, run: Run, cells: list[tuple[str, str]], started: str, *, report: bool
) -> None:
    """Merge finished cells into results.parquet and umap_coords.parquet; write the manifest,
    the knowledge map and findings (:func:`medmap.analysis.maps.build_outputs`) and the report."""
    from medmap.analysis.maps import build_outputs

    sets = list(dict.fromkeys(name for _, name in cells))
    table = merge_results(run, cells)
    extra = _finish_rows(config, run, cells)
    if extra:  # rows the techniques compute from all their cells together, after the cells
        table = normalize(pd.concat([table, *extra], ignore_index=True))
    write_parquet_atomic(table, run.results)
    coords = [pd.read_parquet(p) for p in run.coords_parts()]
    if coords:
        write_parquet_atomic(merge_coords(coords), run.umap_coords)
    items = [
        pd.read_parquet(run.items_part(st, cell_id(n)))
        for st, n in cells
        if run.items_part(st, cell_id(n)).exists()
    ]
    if items:
        write_parquet_atomic(pd.concat(items, ignore_index=True), run.items)
    knows = [pd.read_parquet(run.knows_part(cell_id(n))) for st, n in cells if st == "knows"]
    knows = [k for k in knows if len(k)]
    if knows:
        write_parquet_atomic(pd.concat(knows, ignore_index=True), run.knows)
    manifest = {
        **_manifest_model(config, run),
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
    write_json_atomic(run.manifest_path, manifest)
    build_outputs(run)
    if report:
        from medmap.report.html import build_report

        build_report(run.path)


def _finish_rows(config: RunConfig, run: Run, cells: list[tuple[str, str]]) -> list[pd.DataFrame]:
    """Each technique's :meth:`~medmap.techniques.base.Technique.finish` rows (none for the
    built-in techniques), in registry order."""
    ctx = context(config, run.path)
    out = []
    for name in (t for t in technique_names() if t in config.techniques):
        done = [cell_id(n) for st, n in cells if st == name and run.done(st, cell_id(n))]
        rows = get_technique(name).finish(ctx, [run.read_cell(name, c) for c in done])
        if rows is not None and len(rows):
            out.append(rows)
    return out


def _first_start(run: Run, now: str) -> str:
    started = run.manifest().get("started")
    if started:
        return started
    marker = run.started_path
    if marker.exists():
        return marker.read_text().strip()
    write_text_atomic(marker, now)
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


def merge_results(run: Run, cells: list[tuple[str, str]]) -> pd.DataFrame:
    """Concatenate finished cells in a fixed order (technique, then concept set)."""
    ids = [(stage, cell_id(name)) for stage, name in cells]
    frames = [run.read_cell(stage, c) for stage, c in ids if run.done(stage, c)]
    if not frames:
        raise MedmapError("no results were produced")
    # Cells from different techniques carry different extra columns; concat keeps them all.
    return normalize(pd.concat(frames, ignore_index=True))


def sweep(
    sweep_file: Path, *, ray_address: str | None = "local", report: bool = True
) -> list[Path]:
    """Run ``medmap map`` for every model of a sweep TOML, all cells through one Ray pool.

    The file has a ``[sweep]`` table with ``models = [...]`` and ``out = "runs"`` (one run
    directory per model inside it) plus any :class:`RunConfig` keys shared by every run, and
    optionally ``preset = "quick"``.
    """
    import tomllib

    from medmap.run.config import build_config

    try:
        data = tomllib.loads(Path(sweep_file).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MedmapError(f"cannot read sweep file {sweep_file}: {e}") from None
    head = data.pop("sweep", None)
    if not isinstance(head, dict) or not head.get("models"):
        raise MedmapError(f"{sweep_file} needs a [sweep] table with models = [...]")
    out_root = Path(head.get("out", "runs"))
    preset = data.pop("preset", None)
    now = dt.datetime.now(dt.UTC).isoformat()
    runs = []
    for model in head["models"]:
        cfg = build_config(preset_name=preset, **data, model=model)
        run = Run(out_root / model.replace("/", "__").replace(".", "_"))
        run.prepare(cfg.model_dump(mode="json"))
        runs.append((cfg, run))
    with contextlib.ExitStack() as stack:
        for _, run in runs:
            stack.enter_context(RunLock(run.path))
            run.remove_orphans()
        tasks = [
            (cfg, run.path, stage, name)
            for cfg, run in runs
            for stage, name in plan_cells(cfg)
            if not run.done(stage, cell_id(name))
        ]
        if ray_address is None:
            for cfg, path, stage, name in tasks:
                run_cell(cfg, path, stage, name)
        else:
            from medmap.run.ray import run_cells_on_ray

            run_cells_on_ray(tasks, ray_address)
        for cfg, run in runs:
            finish_run(cfg, run, plan_cells(cfg), _first_start(run, now), report=report)
    return [run.path for _, run in runs]
