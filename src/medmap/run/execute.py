"""Running one cell of a run: the function the in-process runner and the Ray tasks share.

:func:`run_cell` loads the run's model (once per process), asks the cell's technique
(:mod:`medmap.techniques.base`) to compute it and stores the finished cell atomically in the run
directory; a finished cell is skipped. It also records the model's identity and shape in
``model.json``, so finishing a run (the manifest) never loads the weights again.
Neither :mod:`medmap.run.runner` nor :mod:`medmap.run.ray` is imported here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medmap.analysis.results import normalize
from medmap.errors import MedmapError
from medmap.run.config import CAUSAL, RunConfig
from medmap.run.outputs import write_json_atomic
from medmap.run.rundir import Run
from medmap.techniques.base import Cell, RunContext, cell_id, get_technique, technique_names

if TYPE_CHECKING:  # pragma: no cover
    from medmap.model.loading import MedmapModel

_MODELS: dict[str, Any] = {}


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


def context(
    config: RunConfig, out: str | Path, *, strict: bool = False, item_detail: bool = False
) -> RunContext:
    """The :class:`RunContext` of a run of ``config`` in ``out``."""
    return RunContext(
        config=config,
        run=Run(out),
        concept_sets=concept_sets_for(config),
        strict=strict,
        item_detail=item_detail,
    )


def plan_cells(config: RunConfig) -> list[tuple[str, str]]:
    """Every (technique, concept-set spec) cell of a run, in the fixed merge order."""
    ctx = context(config, ".")
    chosen = [t for t in technique_names() if t in config.techniques]  # registry order
    return [(c.technique, c.concept_set) for t in chosen for c in get_technique(t).cells(ctx)]


def loaded_model() -> MedmapModel | None:
    """The model this process loaded for a run, if any."""
    return next(iter(_MODELS.values()), None)


def model_for(config: RunConfig) -> MedmapModel:
    """Load the run's model once per process (Ray workers reuse it across their cells)."""
    from medmap.model.loading import load_model

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
            # gradients need real weights: MXFP4 experts unpacked (a no-op for other checkpoints)
            dequantize="saliency" in config.techniques,
        )
    return _MODELS[key]


def model_info(model: MedmapModel) -> dict[str, Any]:
    """What the manifest records of the model (no weights)."""
    return {
        "model": model.name,
        "n_layers": int(model.n_layers),
        "d_model": int(model.d_model),
        "weights_hash": model.weights_hash,
        "weights_source": model.source,
    }


def record_model(run: Run, model: MedmapModel) -> None:
    """Write ``model.json`` (once; every cell of a run uses the same model)."""
    info = model_info(model)
    if run.model_info() != info:
        write_json_atomic(run.model_info_path, info)


def run_cell(
    config: RunConfig,
    out: str | Path,
    stage: str,
    name: str,
    *,
    strict: bool = False,
    item_detail: bool = False,
) -> str:
    """Compute one (technique, concept set) cell and write it atomically; skip it if finished.

    Returns ``"done"`` or ``"skipped"``.
    """
    run = Run(out)
    technique = get_technique(stage)
    cell = Cell(stage, name, cell_id(name))
    if run.done(stage, cell.key):
        return "skipped"
    if config.known_only and stage in CAUSAL and not run.done("knows", cell.key):
        # the known-only stages read the set's knows cell: compute it first (a Ray worker may
        # get here before the knows task; both write the same cell atomically)
        run_cell(config, out, "knows", name, strict=strict)
    model = model_for(config)
    record_model(run, model)
    ctx = RunContext(config, run, [name], strict=strict, item_detail=item_detail)
    t0 = time.perf_counter()
    df = technique.run_cell(model, cell, ctx)
    df = df.assign(model=model.name, concept_set=_set_name(name))
    run.write_cell(stage, cell.key, normalize(df), time.perf_counter() - t0)
    return "done"


def _set_name(spec: str) -> str:
    from medmap.concepts import load_concepts

    return load_concepts(spec).name
