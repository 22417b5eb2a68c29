"""Run medmap cells as Ray tasks on one machine or a cluster (no home-made scheduler).

Each task is one (model × stage × concept set) cell: it loads the model once per worker
process, computes the cell and writes its Parquet part atomically into the run directory
(which must be on a filesystem every node sees). Failed tasks are retried by Ray; finished
parts are skipped on a re-run, so the driver merges exactly what a single process would write.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from typing import Any

from rich.console import Console

from medmap.config import RunConfig
from medmap.errors import MedmapError

console = Console(stderr=True)


def _init_ray(address: str, num_cpus: int | None = None):
    try:
        import ray
    except ImportError:
        raise MedmapError("Ray is not installed", hint="pip install 'medmap[ray]'") from None
    if not ray.is_initialized():
        if address in ("local", ""):
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    return ray


def resources_for(config: RunConfig) -> dict[str, Any]:
    """Ray resource request of one cell: a GPU when the model runs on CUDA, else one CPU."""
    wants_gpu = (config.device or "").startswith("cuda") or config.device_map not in (None, "cpu")
    req: dict[str, Any] = {"num_cpus": 1}
    if wants_gpu:
        req["num_gpus"] = 1
    return req


def _cell_task(config_json: dict[str, Any], out: str, stage: str, name: str) -> str:
    import torch

    from medmap.runner import run_cell

    torch.set_num_threads(1)  # one core per task; Ray packs tasks onto the cores
    return run_cell(RunConfig(**config_json), out, stage, name)


def run_cells_on_ray(
    tasks: list[tuple[RunConfig, Path, str, str]],
    address: str = "local",
    *,
    max_retries: int = 2,
    num_cpus: int | None = None,
) -> list[str]:
    """Submit every (config, run dir, stage, set) cell as a Ray task and wait for all of them.

    Raises :class:`MedmapError` naming the first cell that still failed after ``max_retries``.
    """
    if not tasks:
        return []
    ray = _init_ray(address, num_cpus)
    remote = ray.remote(_cell_task)
    refs = []
    for config, out, stage, name in tasks:
        opts = {**resources_for(config), "max_retries": max_retries, "retry_exceptions": True}
        refs.append(
            remote.options(**opts).remote(config.model_dump(mode="json"), str(out), stage, name)
        )
    results = []
    for (config, _, stage, name), ref in zip(tasks, refs):
        try:
            results.append(ray.get(ref))
        except Exception as e:  # RayTaskError wraps the worker's exception
            cause = getattr(e, "cause", e)
            if isinstance(cause, MedmapError):
                raise cause from None
            raise MedmapError(
                f"cell {stage}/{name} of {config.model} failed after {max_retries} retries: {cause}"
            ) from None
        console.print(f"[dim]ray: {config.model} {stage}/{name} {results[-1]}[/]")
    return results


def sweep(
    sweep_file: Path, *, ray_address: str | None = "local", report: bool = True
) -> list[Path]:
    """Run ``medmap map`` for every model of a sweep TOML, all cells through one Ray pool.

    The file has a ``[sweep]`` table with ``models = [...]`` and ``out = "runs"`` (one run
    directory per model inside it) plus any :class:`RunConfig` keys shared by every run, and
    optionally ``preset = "quick"``.
    """
    import tomllib

    from medmap.config import build_config
    from medmap.rundir import RunDir, RunLock
    from medmap.runner import _first_start, cell_id, finish_run, plan_cells

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
        run = RunDir(out_root / model.replace("/", "__").replace(".", "_"))
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
            from medmap.runner import run_cell

            for cfg, path, stage, name in tasks:
                run_cell(cfg, path, stage, name)
        else:
            run_cells_on_ray(tasks, ray_address)
        for cfg, run in runs:
            finish_run(cfg, run, plan_cells(cfg), _first_start(run, now), report=report)
    return [run.path for _, run in runs]
