"""A synthetic run directory with known effect profiles (for tests, demos and report previews).

``make_synthetic_run(path, n_layers=10)`` writes what ``medmap map`` writes — ``results.parquet``,
``umap_coords.parquet``, ``manifest.json`` and ``activations/<set>/`` stores — without a model.
Every technique's effect of a concept set is a Gaussian bump over relative depth centred on
``peak`` (medical sets) or ``control_peak`` (control sets). With ``phenomena=True`` the
detectors show an age jump at ``jump_depth``, circular progression, specialty clustering in the
middle layers and a collapse of the effective rank at depth 0.5; with ``False`` none of these.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from medmap.analysis.results import make_rows, write_parquet_atomic

MEDICAL = ("ages", "drugs", "progression")
CONTROL = ("countries", "animals")


def _bump(depth: np.ndarray, centre: float, width: float = 0.12) -> np.ndarray:
    return np.exp(-0.5 * ((depth - centre) / width) ** 2)


def synthetic_table(
    model: str,
    n_layers: int,
    *,
    peak: float = 0.3,
    control_peak: float = 0.7,
    phenomena: bool = True,
    jump_depth: float = 0.5,
    sets: tuple[str, ...] = MEDICAL + CONTROL,
    label: str = "group",
    seed: int = 0,
) -> pd.DataFrame:
    """Tidy results of a fake model (see the module docstring)."""
    rng = np.random.default_rng(seed)
    layers = np.arange(n_layers + 1)
    depth = layers / n_layers
    rows: list[dict] = []

    def add(cset, technique, metric, lay, val, *, width=0.05, **extra):
        for layer, v in zip(lay, val):
            rows.append(
                {
                    "model": model,
                    "layer": int(layer),
                    "relative_depth": layer / n_layers if layer >= 0 else np.nan,
                    "concept_set": cset,
                    "technique": technique,
                    "metric": metric,
                    "value": float(v),
                    "ci_low": float(v - width),
                    "ci_high": float(v + width),
                    "n": 20,
                    "seed": seed,
                }
                | extra
            )

    for cset in sets:
        centre = control_peak if cset in CONTROL else peak
        prof = _bump(depth, centre)
        noise = rng.normal(0, 0.005, len(layers))
        acc = 0.3 + 0.6 * prof + noise
        for layer, v in zip(layers, acc):
            add(cset, "probe", "probe_acc", [layer], [v], label=label, baseline=0.3)
        add(cset, "cluster", "knn_purity", layers, 0.3 + 0.5 * prof, label=label)
        blk = layers[1:]
        share = prof[1:] / prof[1:].sum() * 0.9
        add(cset, "saliency", "grad_x_weight_share", blk, share, width=0.002, module="block")
        add(cset, "saliency", "grad_x_weight_share", blk, share / 2, width=0.002, module="mlp")
        add(cset, "lesion", "delta_nll", blk, 2.0 * prof[1:] - 0.05, window=1)
        add(cset, "lesion", "delta_nll", blk, 3.0 * prof[1:], window=3)
        # the answer's information leaves the concept tokens and reaches the last token at the
        # profile's peak (the patching map's transfer measure peaks there)
        moved = np.clip(np.cumsum(prof) / prof.sum(), 0, 1)
        for pos, val in (("concept", 1.0 - moved), ("last", moved)):
            add(cset, "patching", "restored", layers, val, position=pos, direction="denoise")
        er = 12 - 8 * _bump(depth, 0.5, 0.1) * phenomena + rng.normal(0, 0.1, len(layers))
        add(cset, "geometry", "effective_rank", layers, er, width=0.3, label="")
        add(cset, "geometry", "anisotropy", layers, 0.2 + 0.7 * depth, width=0.02, label="")
        add(cset, "geometry", "mean_norm", layers, 1 + 10 * depth, width=0.1, label="")
        add(cset, "phenomenon", "collapse_recover", [-1], [1.0 if phenomena else 0.0], width=0)
        add(cset, "phenomenon", "collapse_ratio", [-1], [0.35 if phenomena else 1.0])

    jump = 1.5 + 4.0 * _bump(depth, jump_depth, 0.08) * phenomena
    add("ages", "phenomenon", "age_jump_ratio", layers, jump, width=0.3, label="age")
    add("ages", "phenomenon", "age_jump_at", layers, np.full(len(layers), 18.0), width=0,
        label="age", age_from=17.0)  # fmt: skip
    circ = 0.1 + 0.7 * _bump(depth, 0.6, 0.15) * phenomena
    mono = 0.95 - 0.6 * _bump(depth, 0.6, 0.15) * phenomena
    add("progression", "phenomenon", "progression_circularity", layers, circ, label="mean")
    add("progression", "phenomenon", "progression_monotonicity", layers, mono, label="mean")
    spec = (0.3 if phenomena else -0.3) * _bump(depth, 0.5, 0.2)
    add("drugs", "phenomenon", "specialty_minus_mechanism_purity_excess", layers, spec,
        width=0.04, label="specialty-mechanism")  # fmt: skip
    flat = np.ones(len(layers))
    add("ages", "phenomenon", "age_jump_ratio_smooth_null", layers, 1.6 * flat, label="age")
    step = 0.5 + 0.5 * _bump(depth, jump_depth, 0.08) * phenomena
    add("ages", "phenomenon", "age_step_percentile", layers, step, width=0.01, label="age",
        age_from=17.0)  # fmt: skip
    add("ages", "phenomenon", "age_step_percentile_smooth_null", layers, 0.5 * flat, width=0.45,
        label="age")  # fmt: skip
    add("ages", "phenomenon", "age_step_ratio", layers, jump, width=0.3, label="age")
    add("ages", "phenomenon", "age_step_ratio_smooth_null", layers, 1.6 * flat, width=0.3,
        label="age")  # fmt: skip
    tour = 1.0 - 0.45 * _bump(depth, 0.6, 0.15) * phenomena
    add("progression", "phenomenon", "progression_tour_ratio", layers, tour, width=0.03,
        label="mean")  # fmt: skip
    add("progression", "phenomenon", "progression_tour_ratio_perm_null", layers, flat,
        width=0.1, label="mean")  # fmt: skip
    add("progression", "phenomenon", "progression_circularity_perm_null", layers, 0.6 * flat,
        label="mean")  # fmt: skip
    for metric in ("purity_excess", "silhouette_umap30"):
        if metric == "silhouette_umap30":
            add("drugs", "phenomenon", "specialty_minus_mechanism_silhouette_umap30", layers,
                spec, width=0.04, label="specialty-mechanism")  # fmt: skip
        add("drugs", "phenomenon", f"specialty_minus_mechanism_{metric}_perm_null", layers,
            0 * flat, label="specialty-mechanism")  # fmt: skip
    return make_rows(rows)


def make_synthetic_run(
    path: str | Path,
    *,
    model: str = "synthetic-10",
    n_layers: int = 10,
    n_items: int = 24,
    d_model: int = 16,
    seed: int = 0,
    label_values: tuple[str, ...] = ("a", "b", "c"),
    item_prefix: str = "item",
    **table_kw,
) -> Path:
    """Write a complete synthetic run directory at ``path`` and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    table = synthetic_table(model, n_layers, seed=seed, **table_kw)
    write_parquet_atomic(table, path / "results.parquet")
    rng = np.random.default_rng(seed)
    sets = sorted(set(table["concept_set"]))
    coords = []
    item_ids = [f"{i:03d}" for i in range(n_items)]
    groups = [label_values[i % len(label_values)] for i in range(n_items)]
    base = np.random.default_rng(1234).normal(size=(n_items, d_model))  # shared across models
    for cset in sets:
        for layer in range(n_layers + 1):
            angle = layer / n_layers * np.pi
            xy = np.stack([np.cos(np.arange(n_items) + angle), np.sin(np.arange(n_items))], 1)
            xy = xy * (1 + layer) + rng.normal(0, 0.05, xy.shape)
            coords.append(
                pd.DataFrame(
                    {
                        "concept_set": cset,
                        "layer": layer,
                        "relative_depth": layer / n_layers,
                        "item_id": item_ids,
                        "concept": [f"{item_prefix} {i}" for i in item_ids],
                        "x": xy[:, 0],
                        "y": xy[:, 1],
                        "group": groups,
                        "value": np.arange(n_items, dtype=float),
                        "model": model,
                    }
                )
            )
        store = path / "activations" / cset
        store.mkdir(parents=True, exist_ok=True)
        acts = np.empty((n_items, n_layers + 1, d_model), dtype=np.float32)
        for layer in range(n_layers + 1):
            mix = np.random.default_rng(layer // 3).normal(size=(d_model, d_model))
            acts[:, layer] = base @ mix + rng.normal(0, 0.01, (n_items, d_model))
        np.save(store / "activations.npy", acts)
        (store / "manifest.json").write_text(
            json.dumps(
                {
                    "model": model,
                    "layers": list(range(n_layers + 1)),
                    "item_ids": item_ids,
                    "shape": list(acts.shape),
                    "complete": True,
                }
            )
        )
    write_parquet_atomic(pd.concat(coords, ignore_index=True), path / "umap_coords.parquet")
    manifest = {
        "model": model,
        "n_layers": n_layers,
        "d_model": d_model,
        "weights_hash": f"sha256:{seed:064d}",
        "config": {"model": model, "concept_sets": sets, "seed": seed, "preset": "synthetic"},
        "concept_sets": sets,
        "seeds": {"seed": seed},
        "started": "2025-01-01T00:00:00+00:00",
        "finished": "2025-01-01T00:01:00+00:00",
        "stages": {"umap": 12.5, "saliency": 3.0, "lesion": 4.0, "patching": 5.0},
        "host": {"hostname": "synthetic", "cpu_count": 2},
        "versions": {"medmap": "0.1.0", "torch": "n/a"},
        "rows": len(table),
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path
