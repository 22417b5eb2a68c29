"""Knowledge maps: shapes, normalisation, summary figures on profiles with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medmap.analysis.maps import (
    first_half_fraction,
    knowledge_map,
    row_summary,
    shortest_interval,
)
from medmap.analysis.results import COLUMNS, make_rows
from medmap.report.synthetic import synthetic_table


def _saliency(model: str, n_layers: int, cset: str, shares: dict[int, float]) -> list[dict]:
    """Block-share rows for layers 1..n_layers; ``shares`` maps layer -> value (else 0)."""
    return [
        {
            "model": model,
            "layer": layer,
            "relative_depth": layer / n_layers,
            "concept_set": cset,
            "technique": "saliency",
            "metric": "grad_x_weight_share",
            "value": shares.get(layer, 0.0),
            "module": "block",
        }
        for layer in range(1, n_layers + 1)
    ]


def test_shortest_interval_and_first_half():
    v = np.array([0, 1, 0, 0, 3, 1], float)
    assert shortest_interval(v, 0.5) == (4, 4)  # 3 of 5 in one point
    assert shortest_interval(v, 0.8) == (4, 5)  # 4 of 5 in two points
    assert shortest_interval(v, 1.0) == (1, 5)
    assert shortest_interval(np.zeros(4), 0.5) == (-1, -1)
    d = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    assert first_half_fraction(d, [1, 1, 2, 0, 0]) == pytest.approx(3 / 4)  # 0.5 counts half
    assert first_half_fraction(d, [0, 0, 0, 1, 1]) == 0.0
    assert np.isnan(first_half_fraction(d, [0, 0, 0, 0, 0]))


def test_all_effect_in_first_30_percent():
    rows = _saliency("m10", 10, "drugs", {1: 0.5, 2: 0.3, 3: 0.2})
    rows += _saliency("m10", 10, "animals", {8: 0.1, 9: 0.4, 10: 0.1})
    km = knowledge_map(make_rows(rows))
    m = km.matrix("saliency", "m10")
    assert m.shape == (2, 10)
    assert list(m.index) == ["drugs", "animals"]  # medical sets first
    np.testing.assert_allclose(m.loc["drugs"].to_numpy()[:4], [1.0, 0.6, 0.4, 0.0])
    assert m.to_numpy().max() == 1.0
    s = km.summary.set_index(["map", "concept_set"])
    d = s.loc[("saliency", "drugs")]
    assert d["first_half_fraction"] == 1.0
    assert d["peak_layer"] == 1 and d["peak_depth"] == pytest.approx(0.1)
    assert (d["depth50_low"], d["depth50_high"]) == pytest.approx((0.1, 0.1))
    assert (d["depth80_low"], d["depth80_high"]) == pytest.approx((0.1, 0.2))
    assert d["depth80_span"] == pytest.approx(0.2)
    a = s.loc[("saliency", "animals")]
    assert a["first_half_fraction"] == 0.0 and a["peak_layer"] == 9
    assert (a["depth80_low"], a["depth80_high"]) == pytest.approx((0.8, 0.9))
    # the combined map of a single technique equals it
    np.testing.assert_allclose(km.matrix("combined", "m10").to_numpy(), m.to_numpy())
    # contrast: medical (drugs) minus control (animals) at depth 0.1 is 1 - 0
    con = km.contrast[(km.contrast["map"] == "saliency")].set_index("layer")
    assert con.loc[1, "value"] == pytest.approx(1.0)
    assert con.loc[9, "value"] == pytest.approx(-1.0)


def test_representation_subtracts_baseline_and_combined_averages():
    n = 4
    rows = []
    for layer in range(n + 1):
        rows.append(
            {
                "model": "m",
                "layer": layer,
                "relative_depth": layer / n,
                "concept_set": "drugs",
                "technique": "probe",
                "metric": "probe_acc",
                "label": "mechanism",
                "value": [0.4, 0.5, 0.9, 0.7, 0.5][layer],
                "baseline": 0.5,
            }  # fmt: skip
        )
        rows.append(
            {
                "model": "m",
                "layer": layer,
                "relative_depth": layer / n,
                "concept_set": "drugs",
                "technique": "patching",
                "metric": "restored",
                "value": [1, 1, 0.5, 0.0, 0][layer],
                "position": "concept",
                "direction": "denoise",
            }  # fmt: skip
        )
    km = knowledge_map(make_rows(rows))
    rep = km.matrix("representation", "m")
    assert list(rep.index) == ["drugs / mechanism"]
    np.testing.assert_allclose(rep.to_numpy()[0], [0.0, 0.0, 1.0, 0.5, 0.0])  # (v-0.5)+ / 0.4
    # patching: restored at the concept falls 1, 1, 0.5, 0, 0 → transfer 0, 0, .5, .5, 0
    pat = km.matrix("patching", "m").to_numpy()[0]
    np.testing.assert_allclose(pat, [0.0, 0.0, 1.0, 1.0, 0.0])
    comb = km.matrix("combined", "m").to_numpy()[0]
    raw = (np.array([0, 0, 1, 0.5, 0]) + np.array([0, 0, 1, 1, 0])) / 2
    np.testing.assert_allclose(comb, raw / raw.max())
    assert km.available("m") == ["representation", "patching", "combined"]


def test_patching_transfer_combines_concept_drop_and_last_rise():
    concept = [1.0, 0.9, 0.3, 0.1, 0.1]
    last = [0.0, 0.0, 0.2, 0.9, 1.2]  # > 1 is clipped to 1
    rows = [
        {
            "model": "m",
            "layer": layer,
            "relative_depth": layer / 4,
            "concept_set": "drugs",
            "technique": "patching",
            "metric": "restored",
            "value": vals[layer],
            "position": pos,
            "direction": "denoise",
        }
        for pos, vals in (("concept", concept), ("last", last))
        for layer in range(5)
    ]
    from medmap.analysis.maps import patching_transfer

    t = patching_transfer(make_rows(rows)).set_index("layer")["raw"]
    want = [0.0]
    for layer in range(1, 5):
        drop = max(0.0, concept[layer - 1] - concept[layer])
        rise = max(0.0, min(last[layer], 1) - min(last[layer - 1], 1))
        want.append((drop + rise) / 2)
    np.testing.assert_allclose(t.to_numpy(), want)
    km = knowledge_map(make_rows(rows))
    assert km.summary.set_index("map").loc["patching", "peak_layer"] == 3


def test_models_of_different_depth_align_on_relative_depth():
    t = pd.concat([synthetic_table("m10", 10), synthetic_table("m20", 20)], ignore_index=True)
    km = knowledge_map(t)
    assert km.n_layers == {"m10": 10, "m20": 20}
    assert km.matrix("representation", "m10").shape == (5, 11)
    assert km.matrix("representation", "m20").shape == (5, 21)
    assert km.matrix("saliency", "m20").shape == (5, 20)
    assert km.matrix("combined", "m20").shape == (5, 21)
    s = km.summary[(km.summary["map"] == "combined") & (km.summary["concept_set"] == "drugs")]
    # both models: medical effect peaks at depth 0.3 (layer 3 of 10, layer 6 of 20)
    assert s.set_index("model")["peak_layer"].to_dict() == {"m10": 3, "m20": 6}
    np.testing.assert_allclose(s["peak_depth"], 0.3)
    assert (s["first_half_fraction"] > 0.9).all()
    binned = knowledge_map(t, n_bins=5)
    for model in ("m10", "m20"):
        m = binned.matrix("combined", model)
        assert m.shape == (5, 5)
        np.testing.assert_allclose(m.columns.to_numpy(float), [0.1, 0.3, 0.5, 0.7, 0.9])
        assert m.loc["drugs"].idxmax() == pytest.approx(0.3)
    assert (binned.summary["peak_layer"] == -1).all()


def test_tidy_rows_and_missing_techniques():
    km = knowledge_map(synthetic_table("m10", 10))
    tidy = km.tidy()
    assert list(tidy.columns[: len(COLUMNS)]) == COLUMNS
    assert set(tidy["technique"]) == {"map"}
    assert {"normalised_effect", "peak_layer", "first_half_fraction", "depth50_low"} <= set(
        tidy["metric"]
    )
    fh = tidy[(tidy["metric"] == "first_half_fraction") & (tidy["map"] == "combined")]
    assert fh.set_index("concept_set").loc["drugs", "value"] > 0.9
    assert "medical-minus-control" in set(tidy["concept_set"])
    empty = knowledge_map(make_rows([]))
    assert empty.available() == [] and empty.summary.empty and empty.matrix("lesion").empty


def test_row_summary_without_mass():
    out = row_summary([0, 0.5, 1], [0, 0, 0], [0, 1, 2])
    assert out["total_mass"] == 0 and np.isnan(out["peak_depth"])
