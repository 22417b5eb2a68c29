"""Run medmap cells as Ray tasks on one machine or a cluster (no home-made scheduler).

Each task is one (model × stage × concept set) cell: it loads the model once per worker
process, computes the cell and writes its Parquet part atomically into the run directory
(which must be on a filesystem every node sees). Failed tasks are retried by Ray; finished
parts are skipped on a re-run, so the driver merges exactly what a single process would write.
Tasks call :func:`medmap.run.execute.run_cell`, as the in-process runner does; this module does
not import the runner (the runner imports it when a run asks for Ray).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from medmap.errors import MedmapError
from medmap.run.config import RunConfig

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

    from medmap.run import execute

    torch.set_num_threads(1)  # one core per task; Ray packs tasks onto the cores
    return execute.run_cell(RunConfig(**config_json), out, stage, name)


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
