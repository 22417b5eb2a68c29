"""Phenomenon detectors on synthetic activations with planted structure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medmap.techniques.representation import representation_scores
from medmap.techniques.representation.detectors import (
    anisotropy,
    collapse_ratio,
    effective_rank,
    jump,
    path_metrics,
)

D = 32


def _rotation(seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(D, D)))
    return q


def _get(tab: pd.DataFrame, layer: int, metric: str, label: str) -> pd.Series:
    rows = tab[(tab.layer == layer) & (tab.metric == metric) & (tab.label == label)]
    assert len(rows) == 1, (layer, metric, label, len(rows))
    return rows.iloc[0]


# ------------------------------------------------------------------ age


@pytest.fixture(scope="module")
def age_table():
    """Ages 0..60, 4 templates each. Layer 0: smooth drift, a jump at 18 and a bigger fake jump
    at the digit boundary 9->10. Layer 1: age along a 340-degree arc (injective, non-linear)."""
    rng = np.random.default_rng(0)
    ages = np.arange(0, 61)
    sig0 = np.zeros((len(ages), D))
    sig0[:, 0] = ages * 0.1
    sig0[:, 1] = np.where(ages >= 18, 3.0, 0.0)
    sig0[:, 2] = np.where(ages >= 10, 5.0, 0.0)
    sig1 = np.zeros((len(ages), D))
    theta = ages / 60 * np.deg2rad(340)
    sig1[:, 0], sig1[:, 1] = 3 * np.cos(theta), 3 * np.sin(theta)
    sig = np.stack([sig0 @ _rotation(0), sig1 @ _rotation(1)], axis=1)  # (n, 2, D)
    t = 4
    # each template shifts every item alike (large), plus a small item x template interaction
    shift = 2.0 * rng.normal(size=(t, 1, 2, D))
    acts = sig[None] + shift + 0.01 * rng.normal(size=(t, *sig.shape))
    acts = acts.reshape(t * len(ages), 2, D).astype(np.float32)
    item_index = np.tile(np.arange(len(ages)), t)
    template_index = np.repeat(np.arange(t), len(ages))
    token_counts = np.where(ages < 10, 1, 2)
    return representation_scores(
        acts,
        {"age": list(ages)},
        item_index=item_index,
        template_index=template_index,
        token_counts=token_counts,
        n_boot=100,
    )


def test_age_jump_controlled_finds_planted_18(age_table):
    at = _get(age_table, 0, "age_jump_at", "age")
    assert at.value == 18 and at.age_from == 17
    assert at.ci_low <= 18 <= at.ci_high
    ratio = _get(age_table, 0, "age_jump_ratio", "age")
    assert ratio.value > 5 and ratio.ci_low > 3
    assert ratio.ci_low - 1 <= ratio.value <= ratio.ci_high + 1


def test_age_jump_uncontrolled_is_fooled_by_digit_boundary(age_table):
    assert _get(age_table, 0, "age_jump_at_uncontrolled", "age").value == 10
    assert (
        _get(age_table, 0, "age_jump_ratio_uncontrolled", "age").value
        > _get(age_table, 0, "age_jump_ratio", "age").value
    )


def test_age_nonlinearity_gap(age_table):
    linear = _get(age_table, 0, "age_nonlinearity_gap", "age")
    arc = _get(age_table, 1, "age_nonlinearity_gap", "age")
    assert arc.value > 0.2 and arc.ci_low > 0.1
    assert abs(linear.value) < 0.1
    assert _get(age_table, 1, "probe_r2", "age").value < 0.8  # the linear probe reads it poorly


def test_jump_function_direct():
    ages = np.array([1.0, 2, 3, 4, 5, 6, 7, 8])
    z = np.cumsum(np.ones((8, 2)), axis=0)
    z[5:] += 10.0  # jump 5 -> 6
    ratio, at, frm = jump(ages, z, None)
    assert (at, frm) == (6.0, 5.0) and ratio > 5
    # token counts change exactly at the jump: only same-count steps considered
    ratio_c, at_c, _ = jump(ages, z, np.array([1, 1, 1, 1, 1, 2, 2, 2]))
    assert at_c != 6.0 and ratio_c == pytest.approx(1.0)
    # too few same-count steps -> NaN
    assert np.isnan(jump(ages[:4], z[:4], np.array([1, 2, 1, 2]))[0])


def test_age_jump_item_bootstrap_without_templates():
    ages = np.arange(0, 40)
    sig = np.zeros((40, D))
    sig[:, 0] = ages * 0.1
    sig[:, 1] = np.where(ages >= 18, 4.0, 0.0)
    rng = np.random.default_rng(2)
    acts = (sig @ _rotation(2) + 0.02 * rng.normal(size=(40, D)))[:, None, :]
    tab = representation_scores(acts.astype(np.float32), {"age": list(ages)}, n_boot=100)
    at = _get(tab, 0, "age_jump_at_uncontrolled", "age")
    assert at.value == 18 and at.ci_low <= 18 <= at.ci_high
    assert not (tab.metric == "age_jump_ratio").any()  # no token counts: no controlled version


# ------------------------------------------------------------------ progression


def test_path_metrics_circle_vs_line():
    angles = np.linspace(0, 2 * np.pi, 9)[:-1]
    circle = np.c_[np.cos(angles), np.sin(angles)]
    stages = np.arange(1, 9)
    mono_c, circ_c = path_metrics(circle, stages)
    assert circ_c == pytest.approx(1 - 2 * np.sin(np.pi * 7 / 8) / (7 * 2 * np.sin(np.pi / 8)))
    assert circ_c > 0.8
    line = np.c_[stages * 1.0, np.zeros(8)]
    mono_l, circ_l = path_metrics(line, stages)
    assert circ_l == pytest.approx(0.0, abs=1e-12) and mono_l == pytest.approx(1.0)
    assert mono_c < 0.9


def test_progression_detector_in_table():
    rng = np.random.default_rng(3)
    stages = np.arange(1, 9)
    angles = np.linspace(0, 2 * np.pi, 9)[:-1]
    circle = np.zeros((8, D))
    circle[:, 0], circle[:, 1] = 3 * np.cos(angles), 3 * np.sin(angles)
    line = np.zeros((8, D))
    line[:, 2] = stages * 1.0
    line[:, 3] = 5.0
    sig = np.concatenate([circle, line]) @ _rotation(3)
    t = 3
    acts = sig[None] + 0.05 * rng.normal(size=(t, 16, D))
    acts = acts.reshape(t * 16, 1, D).astype(np.float32)
    labels = {
        "series": ["ckd"] * 8 + ["sepsis"] * 8,
        "stage": list(stages) + list(stages),
    }
    tab = representation_scores(
        acts, labels, item_index=np.tile(np.arange(16), t), scaling="center", n_boot=50
    )
    circ_c = _get(tab, 0, "progression_circularity", "ckd")
    circ_l = _get(tab, 0, "progression_circularity", "sepsis")
    assert circ_c.value > 0.7 and circ_c.ci_low > 0.6
    assert circ_l.value < 0.1 and circ_l.ci_high < 0.2
    assert _get(tab, 0, "progression_monotonicity", "sepsis").value > 0.99
    mean = _get(tab, 0, "progression_circularity", "mean")
    assert mean.value == pytest.approx((circ_c.value + circ_l.value) / 2)
    # template noise lengthens resampled paths, so the percentile CI sits slightly low
    assert mean.ci_low - 0.05 <= mean.value <= mean.ci_high + 0.05
    assert mean.ci_high - mean.ci_low < 0.1


# ------------------------------------------------------------------ specialty vs mechanism


def _drugs(by: str, seed: int = 4):
    rng = np.random.default_rng(seed)
    n = 72
    specialty = np.repeat(np.arange(3), 24)
    mechanism = rng.permutation(np.repeat(np.arange(6), 12))
    centers = rng.normal(size=(6, D)) * 4
    cls = specialty if by == "specialty" else mechanism
    acts = (centers[cls] + rng.normal(size=(n, D)))[:, None, :].astype(np.float32)
    labels = {
        "specialty": [f"s{c}" for c in specialty],
        "mechanism": [f"m{c}" for c in mechanism],
    }
    return representation_scores(acts, labels, n_boot=100)


@pytest.mark.parametrize("by", ["specialty", "mechanism"])
def test_specialty_vs_mechanism_sign(by):
    tab = _drugs(by)
    label = "specialty-mechanism"
    sign = 1 if by == "specialty" else -1
    excess = _get(tab, 0, "specialty_minus_mechanism_purity_excess", label)
    assert sign * excess.ci_low > 0 if sign > 0 else excess.ci_high < 0
    pur = _get(tab, 0, "specialty_minus_mechanism_purity", label)
    assert sign * pur.value > 0.3
    # chance purity is higher for 3 classes than for 6: positive chance difference
    assert 0.05 < pur.baseline < 0.3
    sil = _get(tab, 0, "specialty_minus_mechanism_silhouette", label)
    assert sign * sil.value > 0 and (sil.ci_low > 0 if sign > 0 else sil.ci_high < 0)


# ------------------------------------------------------------------ collapse


def test_effective_rank_and_anisotropy():
    rng = np.random.default_rng(5)
    iso = rng.normal(size=(200, 16))
    assert 12 < effective_rank(iso) <= 16
    rank1 = np.outer(rng.normal(size=200), rng.normal(size=16))
    assert effective_rank(rank1) == pytest.approx(1.0, abs=1e-6)
    shared = iso + 50.0  # one huge shared direction
    assert anisotropy(shared) > 0.99
    assert abs(anisotropy(iso)) < 0.02


def _profile_acts(ranks: list[int], seed: int = 6) -> np.ndarray:
    """Items × layers × D where layer l has (approximately) ``ranks[l]`` isotropic dimensions."""
    rng = np.random.default_rng(seed)
    n = 80
    acts = np.zeros((n, len(ranks), D), dtype=np.float32)
    for layer, r in enumerate(ranks):
        basis = _rotation(seed + layer)[:r]
        acts[:, layer] = rng.normal(size=(n, r)) @ basis + 0.001 * rng.normal(size=(n, D))
    return acts


def test_collapse_and_recover_flagged():
    acts = _profile_acts([24, 24, 20, 8, 1, 6, 20, 24, 24])
    tab = representation_scores(acts, {"g": ["a", "b"] * 40}, n_layers=8, n_boot=50)
    er = tab[tab.metric == "effective_rank"].sort_values("layer").value.to_numpy()
    assert er[4] == pytest.approx(1.0, abs=0.05)  # the rank-1 layer
    assert er[0] > 15
    assert _get(tab, -1, "collapse_recover", "").value == 1.0
    assert _get(tab, -1, "collapse_layer", "").value == 4
    ratio = _get(tab, -1, "collapse_ratio", "")
    assert ratio.value < 0.1 and ratio.ci_high < 0.5


@pytest.mark.parametrize(
    "ranks",
    [[20] * 9, [24, 24, 22, 18, 14, 10, 6, 3, 1]],  # flat; collapse without recovery
    ids=["flat", "monotone-decline"],
)
def test_no_collapse_flag(ranks):
    tab = representation_scores(_profile_acts(ranks), {"g": ["a", "b"] * 40}, n_layers=8, n_boot=50)
    assert _get(tab, -1, "collapse_recover", "").value == 0.0
    assert _get(tab, -1, "collapse_ratio", "").value > 0.5


def test_collapse_ratio_definition():
    layers = np.arange(9)
    r = np.array([10, 12, 9, 8, 2, 5, 9, 10, 6.0])
    ratio, at = collapse_ratio(r, layers, 8, early_depth=0.25)
    # early layers 0..2 (max 12), intermediate 3..7 (min 2 at layer 4), last 6
    assert ratio == pytest.approx(2 / 6) and at == 4
    # batched over bootstrap rows
    rb = np.stack([r, r * 0 + 5])
    ratios, _ = collapse_ratio(rb, layers, 8)
    assert ratios[0] == pytest.approx(2 / 6) and ratios[1] == pytest.approx(1.0)


def test_shared_template_bootstrap_cancels_template_shifts():
    from medmap.techniques.representation.features import layer_features, template_bootstrap

    rng = np.random.default_rng(7)
    n, t = 10, 5
    items = rng.normal(size=(n, D))
    prompts = items[None] + 3.0 * rng.normal(size=(t, 1, D))  # pure template shifts
    x = prompts.reshape(t * n, D)
    item_index = np.tile(np.arange(n), t)
    feats = layer_features(
        x.reshape(t, n, D).mean(0),
        x_prompts=x,
        item_index=item_index,
        template_index=np.repeat(np.arange(t), n),
        scaling="center",
    )
    boot = template_bootstrap(feats, 20, np.random.default_rng(0))
    diffs = boot[:, 1:] - boot[:, :-1]
    assert np.allclose(diffs, feats.z[1:] - feats.z[:-1], atol=1e-8)
    # independent per-item resampling does not cancel them
    feats.template_index = None
    boot_ind = template_bootstrap(feats, 20, np.random.default_rng(0))
    assert not np.allclose(boot_ind[:, 1:] - boot_ind[:, :-1], feats.z[1:] - feats.z[:-1])


def test_collapse_ratio_all_nan_profile_is_nan_not_an_error():
    from medmap.techniques.representation.detectors import collapse_ratio

    ranks = np.array([[np.nan, np.nan, np.nan, np.nan, np.nan], [5.0, 4.0, 1.0, 2.0, 5.0]])
    ratio, where = collapse_ratio(ranks, np.arange(5), 4)
    assert np.isnan(ratio[0]) and np.isnan(where[0])
    assert ratio[1] == pytest.approx(1.0 / 5.0) and where[1] == 2
