"""The surface (string-shape) baseline rows of the representation technique (issue 15).

A probe must not get credit for reading a dose level from the number of digits, characters or
tokens of the written amount. For a set whose concepts all start with an amount, the
representation table holds ``surface_probe_acc`` (layer -1: the best surface-feature probe with
the null of that maximum) and per layer the probes on the surface-matched subset
(``probe_acc_surface_matched`` ...). Known answers: a label that *is* the digit count is read
at 1.0; labels balanced within every digit count are not read above the null; the bundled
dosages' matched subset is balanced on every feature; and the rows come out of the technique.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from medmap.concepts import load_concepts
from medmap.concepts.schema import ConceptItem, ConceptSet, LabelSpec
from medmap.concepts.surface import (
    matched_on,
    permutation_null,
    surface_baseline,
    surface_features,
    surface_matched_subset,
    surface_probe_accuracy,
)
from medmap.techniques.representation import representation_scores
from medmap.techniques.representation.api import item_info
from medmap.techniques.representation.surface_rows import plan_surface

LEVELS = ["low", "mid", "high", "max"]
LEVELS_DOSE = ["sub-therapeutic", "usual", "high", "toxic"]  # the bundled dosages' order
SURFACE = ["surface_probe_acc", "surface_probe_acc_by_feature"]
MATCHED = [
    "probe_acc_surface_matched",
    "probe_r2_surface_matched",
    "probe_spearman_surface_matched",
]


def _dose_set(amounts: list[int], levels: list[str], name: str = "custom_doses") -> ConceptSet:
    """Items ``"<amount> mg of x"`` with an ordered level label (and an unordered index)."""
    items = [
        ConceptItem(
            id=f"d{a}",
            concept=f"{a} mg of x",
            labels={"level": lvl, "level_index": LEVELS.index(lvl) + 1},
        )
        for a, lvl in zip(amounts, levels, strict=True)
    ]
    return ConceptSet(
        name=name,
        version=1,
        family="custom",
        medical=False,
        labels={
            "level": LabelSpec(kind="ordinal", order=LEVELS),
            "level_index": LabelSpec(kind="ordinal"),
        },
        templates=["She took {concept} today."],
        items=items,
    )


def cs_concepts(cs) -> list[str]:
    return [it.concept for it in cs.items]


def _planted_acts(levels: list[str], d: int = 8, n_layers: int = 2) -> np.ndarray:
    """``(n_items, n_layers, d)`` activations whose first 4 dims are the level one-hot (x5)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(levels), n_layers, d))
    for i, lvl in enumerate(levels):
        x[i, :, LEVELS.index(lvl)] += 5.0
    return x


def _rows(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    return table[table["metric"].isin(metrics)]


def test_label_equal_to_digit_count_is_read_exactly(capsys):
    """(a) level = number of digits (1, 2, 3, 4): the surface probe is right on every item
    (1.0), far above the 95th percentile of its permutation null; the matched subset is empty
    (no digit count holds two levels), so the per-layer matched probe is skipped with a note."""
    amounts = [a + k for a in (1, 11, 101, 1001) for k in range(8)]
    levels = [LEVELS[len(str(a)) - 1] for a in amounts]
    cs = _dose_set(amounts, levels)
    tab = representation_scores(_planted_acts(levels), cs, n_boot=20)
    top = _rows(tab, ["surface_probe_acc"])
    assert len(top) == 1
    r = top.iloc[0]
    assert (r.layer, r.technique, r.label, r.n) == (-1, "probe", "level", 32)
    assert np.isnan(r.relative_depth)
    assert r.value == 1.0
    assert 0.25 < r.baseline < 0.5, r.baseline  # chance 0.25 for 4 balanced levels
    by = _rows(tab, ["surface_probe_acc_by_feature"]).set_index("feature")
    assert set(by.index) == {"digits", "chars", "shape"}  # no tokenizer: no token count
    assert (by["value"] == 1.0).all()
    assert r.feature == "digits"  # first of the tied features
    # only the ordered label gets the baseline (not the unordered index, not by set name)
    assert set(_rows(tab, SURFACE)["label"]) == {"level"}
    assert _rows(tab, MATCHED).empty
    assert "no surface-matched probe for level" in capsys.readouterr().err


def test_labels_balanced_within_digit_counts_are_not_read():
    """(b) each digit count holds 2 items of every level: the surface probe is at most the
    null's 95th percentile (here below chance: the held-out item's level is the rarer one in
    its training cell). Every item is in the matched subset, and the per-layer probe on it
    reads the level planted in the activations far above its shuffled-label baseline."""
    amounts, levels = [], []
    for base in (1, 11, 101, 1001):
        for j, lvl in enumerate(LEVELS):
            for k in range(2):
                amounts.append(base + 2 * j + k)
                levels.append(lvl)
    cs = _dose_set(amounts, levels)
    n = len(amounts)
    tab = representation_scores(_planted_acts(levels), cs, n_boot=20)
    r = _rows(tab, ["surface_probe_acc"]).iloc[0]
    assert r.value <= r.baseline, (r.value, r.baseline)
    assert r.value < 0.25
    want = surface_baseline(surface_features(cs_concepts(cs)), levels, n_perm=200, seed=0)
    assert r.value == pytest.approx(want.accuracy) and r.baseline == pytest.approx(want.null)
    m = _rows(tab, ["probe_acc_surface_matched"])
    assert sorted(m["layer"]) == [0, 1]
    assert (m["n"] == n).all() and set(m["feature"]) == {"digits+chars"}
    assert (m["value"] >= 0.9).all() and (m["value"] > m["baseline"] + 0.5).all(), m
    r2 = _rows(tab, ["probe_r2_surface_matched"])
    assert len(r2) == 2 and (r2["value"] > r2["baseline"] + 0.5).all(), r2


def test_no_amounts_no_surface_rows():
    """Concepts without a leading amount (one item lacks it) give no surface rows, even for a
    set with an ordered label."""
    amounts = [a + k for a in (1, 11) for k in range(4)]
    levels = [LEVELS[k % 4] for k in range(8)]
    cs = _dose_set(amounts, levels)
    items = list(cs.items)
    items[0] = items[0].model_copy(update={"concept": "some x"})
    cs = cs.model_copy(update={"items": items})
    tab = representation_scores(_planted_acts(levels), cs, n_boot=20)
    assert _rows(tab, SURFACE + MATCHED).empty
    assert "probe_r2" in set(tab["metric"])


def test_surface_baseline_nulls():
    """Per-feature nulls are :func:`permutation_null` with the same seed; the null of the
    maximum is at least every per-feature null."""
    cs = load_concepts("dosages")
    levels = [str(it.labels["dose_level"]) for it in cs.items]
    f = surface_features(cs_concepts(cs))
    b = surface_baseline(f, levels, n_perm=50, seed=3)
    for name in ("digits", "chars", "shape"):
        assert b.accuracies[name] == surface_probe_accuracy(f[name], levels)
        assert b.nulls[name] == pytest.approx(permutation_null(f[name], levels, n_perm=50, seed=3))
        assert b.null >= b.nulls[name]
    assert b.accuracy == max(b.accuracies.values())
    with pytest.raises(ValueError, match="has 3 values"):
        surface_baseline({"digits": [1, 2, 3]}, levels)


def test_matched_on_falls_back_to_fewer_features():
    """All three features jointly leave no balanced cell (``c`` is unique per item), so the
    subset is matched on ``a`` and ``b`` (balanced by construction: every item stays) after
    ``c`` is found at its null on it. A feature equal to the label can never be matched."""
    labels = [lab for lab in LEVELS for _ in range(16)]
    a = [i % 2 for i in range(64)]
    b = [(i // 2) % 2 for i in range(64)]
    c = list(range(64))
    got = matched_on({"a": a, "b": b, "c": c}, labels, n_perm=50)
    assert got is not None
    on, sub = got
    assert on == ("a", "b") and sub == list(range(64))
    # the feature that is the label itself can never be matched, nor anything joint with it
    assert matched_on({"lab": [LEVELS.index(x) for x in labels], "c": c}, labels) is None
    # too few items per level: nothing
    assert matched_on({"a": a}, labels, min_per_label=17) is None


def test_bundled_dosages_surface_rows_and_matched_subset():
    """(c) bundled dosages, no model: digits alone are at the null (the set was built so),
    characters leak (known: grams have a one-letter unit), and the matched subset holds every
    level equally often at every value of every feature."""
    cs = load_concepts("dosages")
    info = item_info(cs, len(cs.items))
    scores, plans, skipped = plan_surface(info, seed=0, n_perm=200)
    assert skipped == [] and [p.label.name for p in plans] == ["dose_level"]
    got = {(s.metric, feat): s for lab, s, feat in scores if lab == "dose_level"}
    digits = got[("surface_probe_acc_by_feature", "digits")]
    chars = got[("surface_probe_acc_by_feature", "chars")]
    assert digits.value <= digits.baseline, (digits.value, digits.baseline)
    assert chars.value > chars.baseline, (chars.value, chars.baseline)
    top = next(s for (m, _f), s in got.items() if m == "surface_probe_acc")
    assert top.value == max(s.value for s in got.values()) and top.n == len(cs.items)

    plan = plans[0]
    levels = [str(it.labels["dose_level"]) for it in cs.items]
    f = surface_features(cs_concepts(cs))
    sub = plan.matched
    assert sub is not None and len(sub) >= 40 and len(sub) % 4 == 0
    for name in ("digits", "chars", "shape"):
        per_value: dict = {}
        for i in sub:
            per_value.setdefault(f[name][i], Counter())[levels[i]] += 1
        for v, c in per_value.items():
            assert set(c) == set(LEVELS_DOSE) and len(set(c.values())) == 1, (name, v, c)
        fs, ls = [f[name][i] for i in sub], [levels[i] for i in sub]
        assert surface_probe_accuracy(fs, ls) <= permutation_null(fs, ls, n_perm=200, seed=0)


def test_representation_technique_emits_surface_rows(tmp_path):
    """(c) the representation technique's cell on a tiny random llama, bundled dosages cut to
    80 items and one template: the layer -1 row is the surface baseline of exactly the items
    the probe scored, token counts from the model's tokenizer included; the matched probe
    rows exist at every layer, on the matched subset."""
    from medmap.run.config import RunConfig
    from medmap.run.rundir import Run
    from medmap.techniques.base import Cell, RunContext
    from medmap.techniques.representation.model import RepresentationTechnique
    from tiny import make_tiny

    model = make_tiny("llama", n_layers=2)
    cfg = RunConfig(
        concept_sets=["dosages"],
        techniques=["umap"],
        umap_max_items=80,
        max_templates=1,
        umap=False,
        n_boot=10,
    )
    ctx = RunContext(config=cfg, run=Run(tmp_path / "run"), concept_sets=["dosages"])
    ctx.progress = False
    tab = RepresentationTechnique().run_cell(model, Cell("umap", "dosages", "dosages"), ctx)

    cs = load_concepts("dosages").subset(80, seed=0)
    levels = [str(it.labels["dose_level"]) for it in cs.items]
    f = surface_features(cs_concepts(cs), model.tokenizer)
    assert set(f) == {"digits", "chars", "tokens", "shape"}
    want = surface_baseline(f, levels, n_perm=200, seed=0)

    top = _rows(tab, ["surface_probe_acc"])
    assert len(top) == 1
    r = top.iloc[0]
    assert (r.layer, r.technique, r.label, r.model) == (-1, "probe", "dose_level", model.name)
    probe_n = set(tab[(tab.metric == "probe_r2") & (tab.label == "dose_level")]["n"])
    assert probe_n == {r.n} == {80}
    assert r.value == pytest.approx(want.accuracy) and r.baseline == pytest.approx(want.null)
    assert r.feature == want.feature
    by = _rows(tab, ["surface_probe_acc_by_feature"]).set_index("feature")["value"]
    assert by.to_dict() == pytest.approx(want.accuracies)

    sub = surface_matched_subset(f["shape"], levels, seed=0)
    assert len(sub) >= 16  # 4 per level: enough to probe
    for metric in MATCHED:
        m = _rows(tab, [metric])
        assert sorted(m["layer"]) == [0, 1, 2], metric
        assert (m["n"] == len(sub)).all() and np.isfinite(m["baseline"]).all()
        assert set(m["feature"]) == {"digits+chars+tokens"}
    # the other rows are untouched: no surface feature column on them
    assert tab.loc[~tab.metric.isin(SURFACE + MATCHED), "feature"].isna().all()
