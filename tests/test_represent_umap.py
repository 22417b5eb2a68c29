"""Per-layer UMAP: determinism, cross-layer consistency, coordinates table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.linalg import orthogonal_procrustes
from sklearn.metrics import silhouette_score

from medmap.techniques.representation import analyse_activations
from medmap.techniques.representation.embed import embed_layers, procrustes_align

D = 32


@pytest.fixture(scope="module")
def clustered():
    """60 items, 4 layers: layer 0 noise, layers 1 and 2 identical clusters, layer 3 shifted."""
    rng = np.random.default_rng(0)
    cls = np.repeat(np.arange(3), 20)
    centers = rng.normal(size=(3, D)) * 4
    acts = rng.normal(size=(60, 4, D)).astype(np.float32)
    acts[:, 1] += centers[cls]
    acts[:, 2] = acts[:, 1]  # identical activations at two adjacent layers
    acts[:, 3] = acts[:, 1] + 0.3 * rng.normal(size=(60, D))
    labels = {"group": [f"g{c}" for c in cls], "age": list(rng.integers(0, 90, 60))}
    return acts, labels, cls


@pytest.fixture(scope="module")
def result(clustered):
    acts, labels, _ = clustered
    return analyse_activations(acts, labels, model_name="synthetic", n_layers=3, seed=0)


def test_coords_table(result, clustered):
    _, labels, cls = clustered
    c = result.coords
    assert list(c.columns[:8]) == [
        "layer",
        "relative_depth",
        "item_id",
        "concept",
        "x",
        "y",
        "method",
        "preprocess",
    ]
    assert {"group", "age"} <= set(c.columns)
    assert len(c) == 60 * 4 and sorted(c.layer.unique()) == [0, 1, 2, 3]
    assert (c.method == "umap").all()
    assert np.isfinite(c[["x", "y"]].to_numpy()).all()
    layer1 = c[c.layer == 1]
    assert layer1.group.tolist() == labels["group"]
    # the clusters are separated in the 2-D map where they exist, not in the noise layer
    assert silhouette_score(layer1[["x", "y"]], cls) > 0.6
    assert silhouette_score(c[c.layer == 0][["x", "y"]], cls) < 0.2


def test_trustworthiness_rows(result):
    t = result.table[result.table.metric == "trustworthiness"]
    assert len(t) == 4 and (t.technique == "umap").all()
    assert (t.value > 0.7).all() and (t.value <= 1).all()


def test_identical_layers_give_identical_coords(result, clustered):
    cls = clustered[2]
    c = result.coords
    a = c[c.layer == 1][["x", "y"]].to_numpy()
    b = c[c.layer == 2][["x", "y"]].to_numpy()
    extent = np.ptp(a, axis=0).max()
    assert np.abs(a - b).max() < 1e-3 * extent
    # a perturbed layer keeps its clusters in the same directions (aligned, not a rotated or
    # reflected copy); UMAP's inter-cluster distances and within-cluster noise may change
    d = c[c.layer == 3][["x", "y"]].to_numpy()
    cosines = []
    for k in range(3):
        u = a[cls == k].mean(0) - a.mean(0)
        v = d[cls == k].mean(0) - d.mean(0)
        cosines.append(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    assert min(cosines) > 0.5 and np.mean(cosines) > 0.7, cosines
    # and the best further rotation/reflection onto the previous layer is the identity
    r, _ = orthogonal_procrustes(d - d.mean(0), b - b.mean(0))
    assert np.allclose(r, np.eye(2), atol=1e-6)


def test_same_seed_same_coordinates(clustered, result):
    acts, labels, _ = clustered
    again = analyse_activations(acts, labels, model_name="synthetic", n_layers=3, seed=0)
    pd.testing.assert_frame_equal(result.coords, again.coords)
    pd.testing.assert_frame_equal(result.table, again.table)


def test_procrustes_undoes_rotation_and_reflection():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(30, 2))
    theta = 1.1
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = (ref @ rot) * np.array([1.0, -1.0]) + 5.0
    assert np.allclose(procrustes_align(moved, ref), ref)


def test_init_alignment_mode_and_pca_fallback():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(12, 5))
    coords, trust, method = embed_layers([z, z + 0.01], align="init", n_epochs=50)
    assert method == "umap" and len(coords) == 2 and coords[0].shape == (12, 2)
    assert np.isfinite(trust).all()
    coords, trust, method = embed_layers([z[:4], z[:4]])
    assert method == "pca" and coords[0].shape == (4, 2)
    assert np.allclose(coords[0], coords[1])
    with pytest.raises(ValueError, match="align"):
        embed_layers([z], align="aligned")
