"""Cluster and probe scores on synthetic activations with known structure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medmap.analysis.results import COLUMNS
from medmap.errors import MedmapError
from medmap.techniques.representation import analyse_activations, representation_scores
from medmap.techniques.representation.scores import clean_categorical, spearman_rows

N_PER, D = 30, 48


def _clustered(seed: int = 0, n_layers: int = 3):
    """Layer 0 pure noise; layers >= 1 have three well separated Gaussian clusters."""
    rng = np.random.default_rng(seed)
    cls = np.repeat(np.arange(3), N_PER)
    centers = rng.normal(size=(3, D)) * 4.0
    acts = rng.normal(size=(len(cls), n_layers + 1, D)).astype(np.float32)
    acts[:, 1:, :] += centers[cls][:, None, :]
    return acts, cls, rng


def _get(tab: pd.DataFrame, layer: int, metric: str, label: str) -> pd.Series:
    rows = tab[(tab.layer == layer) & (tab.metric == metric) & (tab.label == label)]
    assert len(rows) == 1, (layer, metric, label, len(rows))
    return rows.iloc[0]


@pytest.fixture(scope="module")
def clustered_table():
    acts, cls, rng = _clustered()
    labels = {
        "group": [f"g{c}" for c in cls],
        "noise": list(rng.choice(["a", "b", "c"], len(cls))),
    }
    return representation_scores(acts, labels, model_name="synthetic", n_layers=3, seed=0)


def test_clusters_found(clustered_table):
    tab = clustered_table
    for layer in (1, 2, 3):
        assert _get(tab, layer, "knn_purity", "group").value > 0.97
        assert _get(tab, layer, "probe_acc", "group").value > 0.97
        assert _get(tab, layer, "silhouette", "group").value > 0.5
    # Chance-level baselines: three balanced classes -> purity and accuracy ~1/3.
    for metric in ("knn_purity", "probe_acc"):
        assert abs(_get(tab, 2, metric, "group").baseline - 1 / 3) < 0.12
    assert abs(_get(tab, 2, "silhouette", "group").baseline) < 0.05
    # Noise layer: no structure for the real label either.
    assert _get(tab, 0, "knn_purity", "group").value < 0.5
    assert _get(tab, 0, "probe_acc", "group").value < 0.55


def test_shuffled_labels_at_chance(clustered_table):
    tab = clustered_table
    for layer in (0, 2):
        for metric, tol in (("knn_purity", 0.1), ("probe_acc", 0.2)):
            row = _get(tab, layer, metric, "noise")
            assert abs(row.value - row.baseline) < tol, (layer, metric, row.value, row.baseline)
            assert abs(row.value - 1 / 3) < tol + 0.05
        assert abs(_get(tab, layer, "silhouette", "noise").value) < 0.05


def test_table_shape_and_cis(clustered_table):
    tab = clustered_table
    assert list(tab.columns[: len(COLUMNS)]) == COLUMNS
    assert {"position", "preprocess"} <= set(tab.columns)
    assert set(tab.model) == {"synthetic"}
    assert set(tab.technique) == {"cluster", "probe", "geometry", "phenomenon"}
    scored = tab[tab.technique.isin(["cluster", "probe"])]
    assert len(scored) == 4 * 2 * 3
    assert (scored.ci_low <= scored.value + 1e-9).all()
    assert (scored.ci_high >= scored.value - 1e-9).all()
    assert (scored.ci_high > scored.ci_low).any()
    assert np.isfinite(scored[["value", "ci_low", "ci_high", "baseline"]].to_numpy()).all()
    assert np.allclose(tab[tab.layer == 2].relative_depth, 2 / 3)
    assert (scored.n == 90).all()
    assert tab.preprocess.iloc[0] == "standardize+pca48"  # min(50, n - 1, d_model)


def test_ordinal_probe():
    rng = np.random.default_rng(1)
    n = 80
    y = rng.uniform(0, 100, n)
    direction = rng.normal(size=D)
    acts = rng.normal(size=(n, 2, D)).astype(np.float32)
    acts[:, 1, :] += (y[:, None] / 10.0) * direction  # layer 1 encodes y linearly
    tab = representation_scores(acts, {"age": list(y), "rand": list(rng.normal(size=n))})
    assert _get(tab, 1, "probe_r2", "age").value > 0.9
    assert _get(tab, 1, "probe_spearman", "age").value > 0.9
    assert _get(tab, 0, "probe_r2", "age").value < 0.2
    r2 = _get(tab, 1, "probe_r2", "rand")
    assert r2.value < 0.15 and r2.baseline < 0.15
    rho = _get(tab, 1, "probe_spearman", "rand")
    assert abs(rho.value) < 0.35
    # ordinal labels have no cluster metrics
    assert not ((tab.label == "age") & (tab.technique == "cluster")).any()


def test_label_filtering():
    acts, cls, rng = _clustered(n_layers=1)
    vals = [f"g{c}" for c in cls]
    vals[0] = "singleton"  # class of one item: dropped (cross-validation needs >= 2)
    labels = {
        "group": vals,
        "one_class": ["x"] * len(cls),  # < 2 classes: skipped
        "item_id": ("identifier", [f"i{i}" for i in range(len(cls))]),  # never scored
        "note": ("text", ["free text"] * len(cls)),
    }
    tab = representation_scores(acts, labels)
    assert set(tab[tab.label != ""].label) == {"group"}
    assert (tab[tab.label == "group"].n == len(cls) - 1).all()
    keep, codes = clean_categorical(["a", "a", "b", "c", "c", None])
    assert keep.tolist() == [True, True, False, True, True, False]
    assert codes.tolist() == [0, 0, 1, 1]
    assert clean_categorical(["a", "b", "c"]) is None


def test_smallest_class_two_items_uses_two_folds():
    acts, cls, _ = _clustered(n_layers=1)
    vals = [f"g{c}" for c in cls]
    vals[0] = vals[1] = "pair"  # smallest class has 2 items -> StratifiedKFold(2)
    tab = representation_scores(acts, {"group": vals})
    acc = _get(tab, 1, "probe_acc", "group")
    assert acc.value > 0.9 and acc.n == len(cls)


def test_template_averaging_equals_item_means():
    acts, cls, rng = _clustered(n_layers=1)
    n = len(cls)
    # three "templates" per item whose mean is exactly the item's activation
    offsets = rng.normal(size=(3, n, 2, D)).astype(np.float32)
    offsets -= offsets.mean(0, keepdims=True)
    prompts = (acts[None] + offsets).reshape(3 * n, 2, D)
    item_index = np.tile(np.arange(n), 3)
    labels = {"group": [f"g{c}" for c in cls]}
    a = representation_scores(acts, labels)
    b = representation_scores(prompts, labels, item_index=item_index)
    cols = ["layer", "metric", "label", "value", "baseline"]
    pd.testing.assert_frame_equal(a[cols], b[cols], atol=1e-4)


def test_determinism():
    acts, cls, rng = _clustered(n_layers=1)
    labels = {"group": [f"g{c}" for c in cls], "y": list(rng.normal(size=len(cls)))}
    a = representation_scores(acts, labels, seed=3)
    b = representation_scores(acts, labels, seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = representation_scores(acts, labels, seed=4)
    assert not np.allclose(a.ci_low.fillna(0), c.ci_low.fillna(0))


def test_input_errors():
    acts, cls, _ = _clustered(n_layers=1)
    with pytest.raises(MedmapError, match="3-D"):
        representation_scores(acts[:, 0], {"g": list(cls)})
    with pytest.raises(MedmapError, match="values for"):
        representation_scores(acts, {"g": list(cls[:-1])})
    with pytest.raises(MedmapError, match="layer indices"):
        representation_scores(acts, {"g": list(cls)}, layers=[0, 1, 2])


def test_spearman_rows_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    y, p = rng.normal(size=(2, 4, 25))
    p[1] = np.round(p[1])  # ties
    ours = spearman_rows(y, p)
    ref = [spearmanr(y[i], p[i]).statistic for i in range(4)]
    assert np.allclose(ours, ref)


def test_analyse_without_umap_has_empty_coords():
    acts, cls, _ = _clustered(n_layers=1)
    res = analyse_activations(acts, {"g": [str(c) for c in cls]}, umap=False)
    assert res.coords.empty and len(res.table) > 0


def test_ordinal_probe_does_not_extrapolate():
    from medmap.techniques.representation.scores import _cv_predict_reg

    rng = np.random.default_rng(2)
    y = np.arange(40.0)
    z = np.c_[y, rng.normal(size=(40, 3))]
    z[7, 0] = 1e4  # one far outlier: a linear probe would predict ~1e4 for it
    pred = _cv_predict_reg(z, y, 0)
    assert pred.min() >= 0 and pred.max() <= 39


def test_items_without_prompts_rejected():
    acts, cls, _ = _clustered(n_layers=1)
    item_index = np.arange(len(cls))
    item_index[5] = 4  # item 5 has no prompt row
    labels = {"g": [f"g{c}" for c in cls]}
    with pytest.raises(MedmapError, match="every item"):
        representation_scores(acts, labels, item_index=item_index)
