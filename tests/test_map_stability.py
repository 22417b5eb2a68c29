"""Map-row stability (issue 16 item 5): split-half reliability over items, Spearman-Brown
corrected, with rows below 0.5 flagged "unstable" in the map summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

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


def _planted_probe_table(seed=0) -> pd.DataFrame:
    """Two labels over 6 layers and 4 templates: ``cls`` is encoded more strongly with depth
    (the same in every template); ``noise`` is a random label (its probe profile is template
    noise only)."""
    from medmap.techniques.representation.api import representation_scores

    rng = np.random.default_rng(seed)
    n, t, d = 40, 4, 12
    cls = np.arange(n) % 2
    noise = rng.permutation(cls)
    item = rng.normal(size=(n, d))
    direction = np.eye(d)[0]
    signal = [0.0, 0.2, 0.5, 1.0, 1.6, 2.4]
    layers = [item + s * np.outer(2 * cls - 1, direction) for s in signal]
    acts = np.stack(
        [np.stack(layers, 1) + 0.8 * rng.normal(size=(n, len(signal), d)) for _ in range(t)]
    ).reshape(t * n, len(signal), d)
    return representation_scores(
        acts.astype(np.float32),
        {"cls": [str(c) for c in cls], "noise": [str(c) for c in noise]},
        item_index=np.tile(np.arange(n), t),
        template_index=np.repeat(np.arange(t), n),
        n_boot=20,
        model_name="m",
        n_layers=len(signal) - 1,
        concept_set="drugs",
        seed=seed,
    )


def test_representation_rows_get_their_probe_split_half():
    """Planted: a label encoded more strongly with depth gives a reliable probe profile across
    template halves; a random label does not; the map summary carries it."""
    from medmap.analysis.maps import knowledge_map

    rels = []
    for seed in range(3):
        tab = _planted_probe_table(seed)
        st = tab[(tab["technique"] == "stability") & (tab["metric"] == "probe_acc_split_half")]
        rels.append(st.set_index("label")["value"])
    assert min(r["cls"] for r in rels) > 0.8, rels
    assert np.mean([r["noise"] for r in rels]) < 0.3, rels
    assert all(0.0 <= r["noise"] <= 1.0 for r in rels)  # a negative r counts as no reliability
    rel = rels[-1]
    km = knowledge_map(tab, n_layers={"m": 5})
    s = km.summary[km.summary["map"] == "representation"].set_index("label")
    assert s.loc["cls", "reliability"] == pytest.approx(rel["cls"])
    assert s.loc["cls", "unstable"] == 0.0 and s.loc["noise", "unstable"] == 1.0
