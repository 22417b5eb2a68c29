"""The specificity map (issue 16 item 2): medical minus matched control per technique and layer,
blank where the CI contains 0; tested on synthetic tables with a known answer."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medmap.analysis.specificity import ALL_CONTROLS, matched_controls, specificity_map
from medmap.report.synthetic import synthetic_table


def _table(**kw) -> pd.DataFrame:
    return synthetic_table("m", 10, **kw)


def test_identical_medical_and_control_sets_give_zero_everywhere():
    t = _table()
    ctl = t[t["concept_set"] == "animals"]
    t = pd.concat([t[t["concept_set"] != "drugs"], ctl.assign(concept_set="drugs")])
    spec = specificity_map(t, pairs={"drugs": "animals"})
    tech = spec[spec["map"] != "combined"]
    assert set(tech["map"]) == {"representation", "saliency", "lesion", "patching"}
    assert (tech["value"] == 0).all() and not tech["significant"].any()
    assert spec["normalised"].isna().all()  # every cell blank, the combined row too


def test_a_planted_medical_peak_is_found_where_it_was_planted():
    # medical effects peak at depth 0.3, controls at 0.7 (Gaussian bumps, narrow CIs)
    spec = specificity_map(_table(peak=0.3, control_peak=0.7), pairs={"drugs": "animals"})
    for mp in ("saliency", "lesion", "combined"):
        row = spec[(spec["map"] == mp) & (spec["concept_set"] == "drugs")]
        best = row.loc[row["normalised"].idxmax()]
        assert abs(best["relative_depth"] - 0.3) <= 0.1 + 1e-9, mp
        assert best["normalised"] == 1.0 or mp == "combined"
    les = spec[(spec["map"] == "lesion") & (spec["concept_set"] == "drugs")].set_index("layer")
    # where the control's bump is, the medical set's effect is significantly smaller
    assert les.loc[7, "significant"] and les.loc[7, "value"] < 0
    assert np.isclose(les.loc[3, "value"], les.loc[3, "effect"] - les.loc[3, "control_effect"])


def test_unmatched_medical_sets_are_compared_with_all_controls():
    pairs = matched_controls(["ages", "drugs", "progression", "animals", "countries"])
    assert pairs == {"drugs": "animals", "ages": ALL_CONTROLS, "progression": ALL_CONTROLS}
    spec = specificity_map(_table(), pairs=pairs)
    prog = spec[(spec["concept_set"] == "progression") & (spec["map"] == "lesion")]
    t = _table()
    les = t[(t["technique"] == "lesion") & (t["window"] == 1)]
    ctl = les[les["concept_set"].isin(["animals", "countries"])].groupby("layer")["value"].mean()
    assert np.allclose(prog.set_index("layer")["control_effect"], ctl.loc[prog["layer"]])


def test_emergence_map_peaks_where_the_answer_appears():
    from medmap.analysis.maps import knowledge_map

    rows = []
    for cset, step in (("drugs", 4), ("animals", 8)):
        for layer in range(11):
            acc = 0.2 + 0.7 * (layer >= step)  # the lens's choice turns right after `step` blocks
            rows.append(
                dict(model="m", layer=layer, relative_depth=layer / 10, concept_set=cset,
                     technique="logit_lens", metric="lens_accuracy", value=acc,
                     ci_low=acc - 0.05, ci_high=acc + 0.05, n=30)
            )  # fmt: skip
    from medmap.analysis.results import make_rows

    t = make_rows(rows)
    km = knowledge_map(t, n_layers={"m": 10})
    assert km.available("m") == ["emergence"]  # a fifth view; not in the combined map
    s = km.summary.set_index("concept_set")
    assert s.loc["drugs", "peak_layer"] == 4 and s.loc["animals", "peak_layer"] == 8
    spec = specificity_map(t, pairs={"drugs": "animals"})
    em = spec[spec["map"] == "emergence"].set_index("layer")
    assert em.loc[5, "significant"] and em.loc[5, "value"] > 0  # drugs right, animals not yet
    assert not em.loc[9, "significant"]  # both right


def test_a_run_writes_the_specificity_map_and_the_report_shows_it(tmp_path):
    from medmap.report.html import build_report
    from medmap.report.synthetic import make_synthetic_run

    run = make_synthetic_run(tmp_path / "run", n_layers=8, n_items=16)
    html = build_report(run).read_text()
    spec = pd.read_parquet(run / "specificity_map.parquet")
    # synthetic medical sets peak at depth 0.3, controls at 0.7: drugs − animals is positive early
    les = spec[(spec["map"] == "lesion") & (spec["concept_set"] == "drugs")].set_index("layer")
    assert les["control_set"].iloc[0] == "animals"
    assert les.loc[les["normalised"].idxmax(), "relative_depth"] <= 0.5
    assert "Specificity map" in html and (run / "figures" / "specificity_map.png").exists()
