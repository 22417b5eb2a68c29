"""Map-row stability (issue 16 item 5): split-half reliability over items, Spearman-Brown
corrected, with rows below 0.5 flagged "unstable" in the map summary."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medmap.analysis.results import make_rows
from medmap.techniques.summary import split_half_rows


def _items(signal: float, n_items=24, n_layers=12, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    profile = np.exp(-0.5 * ((np.arange(1, n_layers + 1) - 4) / 1.5) ** 2)
    rows = []
    for i in range(n_items):
        vals = signal * profile + rng.normal(0, 1, n_layers)
        for layer, v in zip(range(1, n_layers + 1), vals):
            rows.append(dict(model="m", concept_set="drugs", item_id=f"i{i}", layer=layer,
                             site="block", specific_damage=v))  # fmt: skip
    return pd.DataFrame(rows)


def test_a_shared_profile_is_reliable_and_noise_is_not():
    strong = split_half_rows(_items(3.0), value="specific_damage", map_name="lesion", by=("site",))
    noise = [
        split_half_rows(_items(0.0, seed=s), value="specific_damage", map_name="lesion",
                        by=("site",))[0]["value"]
        for s in range(8)
    ]  # fmt: skip
    assert strong[0]["value"] > 0.9 and strong[0]["n"] == 24 and strong[0]["site"] == "block"
    assert abs(np.mean(noise)) < 0.3 and np.median(noise) < 0.5  # no shared profile
    assert strong[0]["ci_low"] <= strong[0]["value"] <= strong[0]["ci_high"]
    # seeded: the same splits every time
    again = split_half_rows(_items(3.0), value="specific_damage", map_name="lesion", by=("site",))
    assert again[0]["value"] == strong[0]["value"]


def test_unstable_rows_are_flagged_in_the_map_summary():
    from medmap.analysis.maps import knowledge_map
    from medmap.report.synthetic import synthetic_table

    t = synthetic_table("m", 10)
    stab = make_rows(
        [
            dict(
                model="m",
                layer=-1,
                concept_set=c,
                technique="stability",
                metric="map_split_half",
                label="lesion",
                value=v,
                n=20,
                site="block",
            )
            for c, v in (("drugs", 0.9), ("animals", 0.2))
        ]  # fmt: skip
    )
    km = knowledge_map(pd.concat([t, stab], ignore_index=True), n_layers={"m": 10})
    s = km.summary[(km.summary["map"] == "lesion")].set_index("concept_set")
    assert s.loc["drugs", "reliability"] == 0.9 and s.loc["drugs", "unstable"] == 0.0
    assert s.loc["animals", "unstable"] == 1.0
    assert np.isnan(s.loc["ages", "reliability"])  # no measurement, no flag
    # stored in knowledge_map.parquet and read back
    from medmap.analysis.maps import KnowledgeMap

    back = KnowledgeMap.from_tidy(km.tidy()).summary
    b = back[back["map"] == "lesion"].set_index("concept_set")
    assert b.loc["animals", "unstable"] == 1.0


def test_seed_agreement_between_two_runs_of_one_model():
    from medmap.analysis.compare import seed_agreement
    from medmap.analysis.maps import knowledge_map
    from medmap.report.synthetic import synthetic_table

    a = synthetic_table("m (s0)", 10, peak=0.3)
    same = synthetic_table("m (s1)", 10, peak=0.3)
    moved = synthetic_table("m (s2)", 10, peak=0.8)
    km = knowledge_map(pd.concat([a, same, moved], ignore_index=True))
    ok = seed_agreement(km, "m (s0)", "m (s1)").set_index(["map", "concept_set", "label"])
    bad = seed_agreement(km, "m (s0)", "m (s2)").set_index(["map", "concept_set", "label"])
    assert ok.loc[("lesion", "drugs", ""), "agreement"] > 0.99
    assert not ok.loc[("lesion", "drugs", ""), "unstable"]
    assert bad.loc[("lesion", "drugs", ""), "agreement"] < 0.5
    assert bad.loc[("lesion", "drugs", ""), "unstable"]
