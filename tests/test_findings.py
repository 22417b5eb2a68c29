"""Findings table: every phenomenon PRESENT on a table built to have it, ABSENT on one built
without it. Expected values are derived in the tests from the constructed inputs (geometry of
toy embeddings, the rules of docs/detectors.md), not copied from the implementation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from medmap.analysis.findings import (
    CIRCULARITY_MIN,
    FINDINGS,
    JUMP_RATIO_MIN,
    findings_table,
)
from medmap.analysis.maps import knowledge_map
from medmap.analysis.results import make_rows
from medmap.report.synthetic import synthetic_table

N = 8  # blocks of the toy model: layers 0..8, relative depth layer / 8
LAYERS = np.arange(N + 1)
DEPTH = LAYERS / N


def rows(metric, values, *, cset, label="", technique="phenomenon", half=None, lo=None,
         hi=None, layers=LAYERS, model="toy", **extra) -> list[dict]:  # fmt: skip
    """One tidy row per layer; CI = value ± ``half`` or the given ``lo``/``hi`` arrays."""
    values = np.asarray(values, float)
    if half is not None:
        lo, hi = values - half, values + half
    lo = np.full(len(values), np.nan) if lo is None else np.asarray(lo, float)
    hi = np.full(len(values), np.nan) if hi is None else np.asarray(hi, float)
    return [
        {
            "model": model,
            "layer": int(layer),
            "relative_depth": layer / N if layer >= 0 else np.nan,
            "concept_set": cset,
            "technique": technique,
            "metric": metric,
            "label": label,
            "value": v,
            "ci_low": a,
            "ci_high": b,
        }
        | extra
        for layer, v, a, b in zip(layers, values, lo, hi)
    ]


def finding(table: pd.DataFrame, name: str, model: str = "toy") -> pd.Series:
    f = findings_table(table)
    assert list(f.loc[f["model"] == model, "finding"]) == list(FINDINGS)
    return f[(f["model"] == model) & (f["finding"] == name)].iloc[0]


# ---------------------------------------------------------------------------------------------
# Age discontinuity


AGES = np.arange(10, 31)  # 10..30, all two-digit: one token-count class, every step controlled
NULL = (1.5, 1.2, 1.8)  # a smooth-null row: mean, 95 % range


def age_ratio(jump: float) -> tuple[float, float, float]:
    """1-D toy age code z(a) = a + jump·[a >= 18]: ``(ratio, age_from, age_to)`` by the
    detector's definition (largest step between consecutive ages / median step)."""
    z = AGES + jump * (AGES >= 18)
    steps = np.abs(np.diff(z))
    j = int(np.argmax(steps))
    return float(steps.max() / np.median(steps)), float(AGES[j]), float(AGES[j + 1])


def null_rows(metric, null, *, cset, label, n=N + 1) -> list[dict]:
    v, lo, hi = (np.full(n, x, float) if np.isscalar(x) else np.asarray(x, float) for x in null)
    return rows(metric, v, cset=cset, label=label, lo=lo, hi=hi)


def age_table(jumps: list[float], half: float = 0.5, null=NULL, control=None) -> pd.DataFrame:
    ratios = [age_ratio(j)[0] for j in jumps]
    at = [age_ratio(j)[2] for j in jumps]
    frm = [age_ratio(j)[1] for j in jumps]
    r = rows("age_jump_ratio", ratios, cset="ages", label="age", half=half)
    for row, f in zip(rows("age_jump_at", at, cset="ages", label="age"), frm):
        r.append(row | {"age_from": f})
    if null is not None:
        r += null_rows("age_jump_ratio_smooth_null", null, cset="ages", label="age")
    if control is not None:  # the years control set: its own controlled ratio per layer
        r += rows("age_jump_ratio", control, cset="years", label="year", half=half)
    return make_rows(r)


def test_age_discontinuity_present_and_where():
    # the code jumps most at layer 3, and clears the rule at layers 2-4 (3 consecutive layers)
    jumps = [0.0, 0.0, 2.0, 4.0, 2.5, 0.5, 0.0, 0.0, 0.0]
    t = age_table(jumps)
    ratios = np.array([age_ratio(j)[0] for j in jumps])
    k = int(np.argmax(ratios))
    assert k == 3 and ratios[k] == pytest.approx(5.0)  # step 1 + 4 over median step 1
    assert ratios[k] - 0.5 > max(JUMP_RATIO_MIN, NULL[2])  # constructed to clear the rule
    f = finding(t, "age_discontinuity")
    assert f["present"]
    assert f["value"] == pytest.approx(ratios[k])
    assert (f["ci_low"], f["ci_high"]) == pytest.approx((ratios[k] - 0.5, ratios[k] + 0.5))
    assert (f["null_value"], f["null_ci_low"], f["null_ci_high"]) == pytest.approx(NULL)
    _, a_from, a_to = age_ratio(jumps[k])
    assert (a_from, a_to) == (17, 18)
    assert f"age {a_from:g}→{a_to:g}" in f["where"]
    assert f"layer {k} " in f["where"] and f"{k / N:.2f}" in f["where"]
    assert "no control set" in f["detail"] and np.isnan(f["control_value"])


def test_age_discontinuity_absent():
    # largest ratio 2.2 > 2, but its CI (1.7, 2.7) does not clear 2: not a discontinuity
    jumps = [0.0, 0.2, 1.2, 0.6, 0.0, 0.0, 0.0, 0.0, 0.0]
    t = age_table(jumps)
    best = max(age_ratio(j)[0] for j in jumps)
    assert best == pytest.approx(2.2) and best - 0.5 < JUMP_RATIO_MIN
    f = finding(t, "age_discontinuity")
    assert not f["present"]
    assert f["value"] == pytest.approx(best)
    # no jump at all: the ratio is 1 everywhere
    f0 = finding(age_table([0.0] * (N + 1)), "age_discontinuity")
    assert not f0["present"] and f0["value"] == pytest.approx(1.0)


def test_age_discontinuity_needs_the_null_and_the_control():
    jumps = [0.0, 0.0, 2.0, 4.0, 2.5, 0.5, 0.0, 0.0, 0.0]  # ratios 3, 5, 3.5 (± 0.5) at 2-4
    # a smooth null reaching 6 at every layer: the jump is what a smooth curve gives
    f = finding(age_table(jumps, null=(5.0, 4.0, 6.0)), "age_discontinuity")
    assert not f["present"] and f["null_ci_high"] == pytest.approx(6.0)
    # no null rows at all (a map from before the nulls): nothing is claimed
    f = finding(age_table(jumps, null=None), "age_discontinuity")
    assert not f["present"] and "no null rows" in f["detail"]
    # the years control jumps as much at layer 3: only 2 + 4 remain, no 3 consecutive layers
    ctl = np.ones(N + 1)
    ctl[3] = 4.8
    f = finding(age_table(jumps, control=ctl), "age_discontinuity")
    assert not f["present"]
    assert f["control_set"] == "years" and f["control_value"] == pytest.approx(4.8)
    # a flat control leaves it standing
    f = finding(age_table(jumps, control=np.ones(N + 1)), "age_discontinuity")
    assert f["present"] and f["control_value"] == pytest.approx(1.0)
    assert (f["control_ci_low"], f["control_ci_high"]) == pytest.approx((0.5, 1.5))


def test_age_discontinuity_without_ci_uses_the_value():
    ratios = [age_ratio(j)[0] for j in [0, 0, 3.0, 3.0, 3.0, 0, 0, 0, 0]]  # 4.0 at layers 2-4
    r = rows("age_jump_ratio", ratios, cset="ages", label="age")
    r += null_rows("age_jump_ratio_smooth_null", NULL, cset="ages", label="age")
    f = finding(make_rows(r), "age_discontinuity")
    assert f["present"] and np.isnan(f["ci_low"]) and "age ?" in f["where"]
    # one isolated layer clearing its null is what ~30 tests give by chance: not claimed
    ratios = [age_ratio(j)[0] for j in [0, 0, 0, 3.0, 0, 0, 0, 0, 0]]
    r = rows("age_jump_ratio", ratios, cset="ages", label="age")
    r += null_rows("age_jump_ratio_smooth_null", NULL, cset="ages", label="age")
    assert not finding(make_rows(r), "age_discontinuity")["present"]


def test_age_break_17_18_against_its_null():
    pct = np.full(N + 1, 0.5)
    pct[3:6] = 1.0
    r = rows("age_step_percentile", pct, cset="ages", label="age", half=0.01, age_from=17.0)
    r += null_rows("age_step_percentile_smooth_null", (0.5, 0.05, 0.95), cset="ages", label="age")
    ratio = np.full(N + 1, 1.0)
    ratio[3:6] = [5.0, 6.0, 5.0]
    r += rows("age_step_ratio", ratio, cset="ages", label="age", half=0.5)
    r += null_rows("age_step_ratio_smooth_null", NULL, cset="ages", label="age")
    f = finding(make_rows(r), "age_break_17_18")
    assert f["present"] and "layer 4 " in f["where"] and "17→18" in f["where"]
    assert f["value"] == pytest.approx(1.0)
    assert (f["null_ci_low"], f["null_ci_high"]) == pytest.approx((0.05, 0.95))
    # the same step is typical of the smooth null: absent
    r2 = [x for x in r if x["metric"] != "age_step_ratio_smooth_null"]
    r2 += null_rows("age_step_ratio_smooth_null", (5.0, 3.0, 8.0), cset="ages", label="age")
    r2 = [x for x in r2 if x["metric"] != "age_step_percentile_smooth_null"]
    r2 += null_rows("age_step_percentile_smooth_null", (0.8, 0.3, 1.0), cset="ages", label="age")
    assert not finding(make_rows(r2), "age_break_17_18")["present"]


# ---------------------------------------------------------------------------------------------
# Progression circularity


def path_scores(p: np.ndarray) -> tuple[float, float, float]:
    """``(circularity, monotonicity, closed-tour ratio)`` of a stage path by the definitions in
    docs/detectors.md."""
    steps = np.linalg.norm(np.diff(p, axis=0), axis=1).sum()
    circ = 1 - np.linalg.norm(p[-1] - p[0]) / steps
    c = p - p.mean(0)
    pc1 = np.linalg.svd(c, full_matrices=False)[2][0]
    mono = abs(spearmanr(np.arange(len(p)), c @ pc1).statistic)
    s = len(p)
    pair = np.linalg.norm(p[:, None] - p[None], axis=-1).sum() / (s * (s - 1))
    tour = (steps + np.linalg.norm(p[-1] - p[0])) / (s * pair)
    return float(circ), float(mono), float(tour)


S = 8
STAGE = np.arange(S)
LINE = np.stack([STAGE, np.zeros(S)], 1).astype(float)  # straight, in stage order
ELLIPSE = np.stack([2 * np.cos(2 * np.pi * STAGE / S), np.sin(2 * np.pi * STAGE / S)], 1)
ZIGZAG = np.stack([STAGE, 4.0 * (STAGE % 2)], 1).astype(float)  # long path, monotone drift
SCATTER = np.random.default_rng(3).normal(size=(S, 2))  # no order at all
TOUR_NULL = (1.0, 0.85, 1.15)  # random stage orders: expectation exactly 1


def progression_table(paths: list[np.ndarray]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    scores = np.array([path_scores(p) for p in paths])
    circ, mono, tour = scores[:, 0], scores[:, 1], scores[:, 2]
    r = rows("progression_circularity", circ, cset="progression", label="mean", half=0.05)
    r += rows("progression_monotonicity", mono, cset="progression", label="mean", half=0.05)
    r += rows("progression_tour_ratio", tour, cset="progression", label="mean", half=0.03)
    r += null_rows("progression_tour_ratio_perm_null", TOUR_NULL, cset="progression", label="mean")
    r += null_rows(
        "progression_circularity_perm_null", (0.8, 0.7, 0.9), cset="progression", label="mean"
    )
    # per-series rows must not be mistaken for the mean
    r += rows("progression_circularity", np.full(N + 1, 0.99), cset="progression", label="s1")
    return make_rows(r), circ, tour


def blend(w: float) -> np.ndarray:
    return (1 - w) * LINE + w * ELLIPSE


def test_progression_circularity_present():
    weights = [0.0, 0.1, 0.3, 0.9, 1.0, 0.9, 0.4, 0.1, 0.0]  # a closed loop at layers 3-5
    t, circ, tour = progression_table([blend(w) for w in weights])
    k = int(np.argmax(circ))
    assert k in (3, 4, 5)
    # 8 points on a circle: the closing chord is one of 8 equal sides -> 1 - 1/7 (0.86)
    circle = np.stack([np.cos(2 * np.pi * STAGE / S), np.sin(2 * np.pi * STAGE / S)], 1)
    assert path_scores(circle)[0] == pytest.approx(1 - 1 / 7)
    assert tour[k] + 0.03 < TOUR_NULL[1]  # the loop's closed tour is short
    f = finding(t, "progression_circularity")
    assert f["present"]
    assert f["value"] == pytest.approx(tour[k])
    assert (f["ci_low"], f["ci_high"]) == pytest.approx((tour[k] - 0.03, tour[k] + 0.03))
    assert (f["null_value"], f["null_ci_low"], f["null_ci_high"]) == pytest.approx(TOUR_NULL)
    assert f"layer {k} " in f["where"]
    assert f"circularity {circ[k]:.2f}" in f["detail"] and "[0.70, 0.90]" in f["detail"]


def test_progression_circularity_absent():
    # straight paths: circularity 0 (their closed tour is short too: out and back)
    t, circ, tour = progression_table([LINE] * (N + 1))
    assert tour[0] < TOUR_NULL[1]
    f = finding(t, "progression_circularity")
    assert not f["present"]
    # a long zig-zag path is "circular" by path length but still progresses monotonically
    t, circ, _ = progression_table([LINE] * 4 + [ZIGZAG] + [LINE] * 4)
    assert circ[4] > CIRCULARITY_MIN
    assert not finding(t, "progression_circularity")["present"]
    # an ordered path that bends back only part of the way: circularity above 0.5 but below
    # what the same points give in random order (SmolLM2's progression at most layers)
    t, circ, _ = progression_table([blend(0.6)] * (N + 1))
    t = t[t["metric"] != "progression_circularity_perm_null"]
    t = pd.concat([t, make_rows(null_rows("progression_circularity_perm_null", (0.8, circ[0] + 0.1, 0.9), cset="progression", label="mean"))])  # fmt: skip
    assert circ[0] > CIRCULARITY_MIN
    f = finding(t, "progression_circularity")
    assert not f["present"] and "returns at 0," in f["detail"]
    # points in no order: circularity at its floor (> 0.5) but the tour is a random one
    t, circ, tour = progression_table([SCATTER] * (N + 1))
    assert circ[0] > CIRCULARITY_MIN and TOUR_NULL[1] < tour[0] < TOUR_NULL[2]
    assert not finding(t, "progression_circularity")["present"]
    # circular but the monotonicity at that layer is unknown: not claimed
    t, circ, _ = progression_table([blend(1.0)] * (N + 1))
    t = t[t["metric"] != "progression_monotonicity"]
    assert not finding(t, "progression_circularity")["present"]
    # no null rows: not claimed
    t, _, _ = progression_table([blend(1.0)] * (N + 1))
    t = t[t["metric"] != "progression_tour_ratio_perm_null"]
    f = finding(t, "progression_circularity")
    assert not f["present"] and "no null rows" in f["detail"]


# ---------------------------------------------------------------------------------------------
# Specialty vs mechanism


MIDDLE_LAYERS = LAYERS[(DEPTH >= 0.25) & (DEPTH <= 0.75)]  # 2..6
SPEC_NULL = (0.0, -0.05, 0.05)


def spec_table(values, half=0.08, metric="specialty_minus_mechanism_purity_excess", null=SPEC_NULL):
    r = rows(metric, values, cset="drugs", label="specialty-mechanism", half=half)
    r += null_rows(f"{metric}_perm_null", null, cset="drugs", label="specialty-mechanism")
    return make_rows(r)


def expected_spec(values, half=0.08):
    v = np.asarray(values, float)[MIDDLE_LAYERS]
    pos, neg = int((v - half > SPEC_NULL[2]).sum()), int((v + half < SPEC_NULL[1]).sum())
    sign = "specialty" if pos > len(v) / 2 else "mechanism" if neg > len(v) / 2 else "mixed"
    return v.mean(), pos, neg, sign


@pytest.mark.parametrize(
    ("values", "sign"),
    [
        # specialty in 3 of the 5 middle layers; outer layers lean to mechanism (ignored)
        ([-0.2, -0.1, 0.15, 0.2, 0.3, 0.05, -0.1, -0.2, -0.3], "specialty"),
        ([0.2, 0.1, -0.15, -0.2, -0.3, -0.05, 0.1, 0.2, 0.3], "mechanism"),
        ([0.3, 0.3, 0.2, 0.2, -0.2, -0.2, 0.0, 0.3, 0.3], "mixed"),
        # above 0 but inside the null's range + CI: not claimed
        ([0.0, 0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0], "mixed"),
    ],
)
def test_specialty_vs_mechanism_sign_by_layer(values, sign):
    mean, pos, neg, expected_sign = expected_spec(values)
    assert len(MIDDLE_LAYERS) == 5 and expected_sign == sign
    f = finding(spec_table(values), "specialty_vs_mechanism")
    assert f["present"] == (sign == "specialty")
    assert f["value"] == pytest.approx(mean)
    assert (f["ci_low"], f["ci_high"]) == pytest.approx((mean - 0.08, mean + 0.08))
    assert (f["null_ci_low"], f["null_ci_high"]) == pytest.approx(SPEC_NULL[1:])
    assert f["where"].startswith(f"{sign}: above the null at {pos}/5 middle layers, below at {neg}")


def test_specialty_vs_mechanism_umap30_is_its_own_finding():
    v = [0.0, 0.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0]
    t = spec_table(v, metric="specialty_minus_mechanism_silhouette_umap30")
    assert finding(t, "specialty_vs_mechanism_umap30")["present"]
    f = finding(t, "specialty_vs_mechanism")
    assert not f["present"] and f["detail"].startswith("no ")
    # without the null rows nothing is claimed
    t = t[~t["metric"].str.endswith("_perm_null")]
    assert not finding(t, "specialty_vs_mechanism_umap30")["present"]


# ---------------------------------------------------------------------------------------------
# Collapse and recovery


def bump(depth, centre, width):
    return np.exp(-0.5 * ((depth - centre) / width) ** 2)


U_SHAPE = 10 - 8 * bump(DEPTH, 0.5, 0.12)  # collapses mid-depth, recovers
FLAT = np.full(N + 1, 10.0)
DECLINE = 10 - 8 * DEPTH  # falls and never recovers


def collapse_ratio(r: np.ndarray) -> float:
    """The detector's ratio (docs/detectors.md): min over intermediate layers over the smaller
    of the early maximum (depth <= 0.25) and the last layer's value."""
    early = DEPTH <= 0.25
    inner = (LAYERS[early].max() < LAYERS) & (LAYERS[-1] > LAYERS)
    return float(r[inner].min() / min(r[early].max(), r[-1]))


def collapse_table(profiles: dict[str, np.ndarray], half=0.05) -> pd.DataFrame:
    r = []
    for cset, prof in profiles.items():
        ratio = collapse_ratio(prof)
        flag = [int(ratio < 0.5)]
        r += rows("effective_rank", prof, cset=cset, technique="geometry", half=0.5)
        r += rows("collapse_ratio", [ratio], cset=cset, layers=[-1], half=half)
        # the flag's CI is the flag of the ratio's CI ends
        r += rows("collapse_recover", flag, cset=cset, layers=[-1],
                  lo=[int(ratio + half < 0.5)], hi=[int(ratio - half < 0.5)])  # fmt: skip
    return make_rows(r)


def test_collapse_recover_present_and_whose_property():
    assert collapse_ratio(U_SHAPE) < 0.5 < min(collapse_ratio(FLAT), collapse_ratio(DECLINE))
    profiles = {"drugs": U_SHAPE, "ages": U_SHAPE * 1.5, "animals": FLAT}
    f = finding(collapse_table(profiles), "collapse_recover")
    assert f["present"]
    assert f["value"] == pytest.approx(collapse_ratio(U_SHAPE))  # mean over the medical sets
    assert "layer 4 " in f["where"]
    assert "2/2 medical sets, 0/1 control sets: specific to the medical sets" in f["detail"]
    assert f["control_set"] == "animals"
    assert f["control_value"] == pytest.approx(collapse_ratio(FLAT))
    # the control collapses too: still present, reported as the model's property
    f = finding(collapse_table({**profiles, "animals": U_SHAPE}), "collapse_recover")
    assert f["present"] and "a property of the model" in f["detail"]


@pytest.mark.parametrize(
    ("profiles", "half"),
    [
        ({"drugs": U_SHAPE, "ages": FLAT, "animals": DECLINE}, 0.05),  # 1 of 2 medical
        ({"drugs": FLAT, "ages": DECLINE}, 0.05),
        # the ratio's CI reaches the fraction: the flag is not sure
        ({"drugs": U_SHAPE, "ages": U_SHAPE}, 0.4),
    ],
)
def test_collapse_recover_absent(profiles, half):
    f = finding(collapse_table(profiles, half), "collapse_recover")
    assert not f["present"]
    med = [p for s, p in profiles.items() if s != "animals"]
    assert f["value"] == pytest.approx(np.mean([collapse_ratio(p) for p in med]))


# ---------------------------------------------------------------------------------------------
# First-half fraction


BLOCKS = np.arange(1, N + 1)  # saliency and lesion are per block: layers 1..8


def effect_table(profiles: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """``profiles[cset][technique]``: saliency block shares or lesion Δ NLL over blocks 1..8."""
    r = []
    for cset, techs in profiles.items():
        for tech, vals in techs.items():
            metric = "grad_x_weight_share" if tech == "saliency" else "delta_nll"
            extra = {"module": "block"} if tech == "saliency" else {"window": 1}
            r += rows(metric, vals, cset=cset, technique=tech, layers=BLOCKS, **extra)
    return make_rows(r)


def half_fraction(v) -> float:
    """Mass before depth 0.5, plus half of the mass at 0.5, over the total (blocks 1..8)."""
    v, d = np.asarray(v, float), BLOCKS / N
    return float((v[d < 0.5].sum() + 0.5 * v[d == 0.5].sum()) / v.sum())


def combined(techs: dict[str, list[float]]) -> np.ndarray:
    """Each technique row scaled to peak 1, averaged, rescaled to peak 1."""
    m = np.mean([np.asarray(v, float) / max(v) for v in techs.values()], axis=0)
    return m / m.max()


EARLY = {
    "drugs": {"saliency": [0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0], "lesion": [0, 2, 1, 0, 0, 0, 1, 0]},
    "ages": {"saliency": [0.1, 0.5, 0.2, 0.1, 0.1, 0, 0, 0], "lesion": [3, 1, 0, 1, 0, 0, 0, 0]},
    # a control set with all its effect late must not count
    "animals": {"saliency": [0, 0, 0, 0, 0, 0, 0.5, 0.5], "lesion": [0, 0, 0, 0, 0, 0, 1, 2]},
}


def test_first_half_present():
    medical = ["drugs", "ages"]
    fracs = [half_fraction(combined(EARLY[s])) for s in medical]
    value = float(np.mean(fracs))
    assert value > 0.5
    per_tech = {
        tech: np.mean([half_fraction(EARLY[s][tech]) for s in medical])
        for tech in ("lesion", "saliency")
    }
    f = finding(effect_table(EARLY), "first_half")
    assert f["present"]
    assert f["value"] == pytest.approx(value)
    # percentile bootstrap of the mean over techniques stays within their range
    lo, hi = min(per_tech.values()), max(per_tech.values())
    assert lo - 1e-12 <= f["ci_low"] <= f["ci_high"] <= hi + 1e-12
    shown = dict(kv.split() for kv in f["detail"].removeprefix("per technique: ").split(", "))
    assert shown.keys() == per_tech.keys()
    for tech, v in per_tech.items():
        assert float(shown[tech]) == pytest.approx(v, abs=0.0051)  # printed with 2 decimals
    assert f["where"] == "2 medical concept sets"


def test_first_half_absent():
    late = {s: {t: v[::-1] for t, v in techs.items()} for s, techs in EARLY.items()}
    value = np.mean([half_fraction(combined(late[s])) for s in ("drugs", "ages")])
    assert value < 0.5
    f = finding(effect_table(late), "first_half")
    assert not f["present"] and f["value"] == pytest.approx(value)
    # exactly half (equal mass at depths 0.25 and 0.75) is not "most in the first half"
    even = {"drugs": {"saliency": [0, 1, 0, 0, 0, 1, 0, 0]}}
    assert half_fraction(even["drugs"]["saliency"]) == 0.5
    f = finding(effect_table(even), "first_half")
    assert f["value"] == pytest.approx(0.5) and not f["present"]
    # only control sets: no figure
    f = finding(effect_table({"animals": EARLY["animals"]}), "first_half")
    assert np.isnan(f["value"]) and not f["present"]
    assert "no combined map" in f["detail"]


def test_first_half_with_custom_medical_sets():
    t = effect_table(EARLY)
    f = findings_table(t, medical=["animals"]).set_index("finding").loc["first_half"]
    assert f["value"] == pytest.approx(half_fraction(combined(EARLY["animals"])))
    assert not f["present"]
    km = knowledge_map(t)
    f2 = findings_table(t, km).set_index("finding").loc["first_half"]
    assert f2["present"]


def test_first_half_vs_control():
    """Medical sets earlier than the control: present; every set early: first_half only."""
    med = [half_fraction(combined(EARLY[s])) for s in ("drugs", "ages")]
    ctl = half_fraction(combined(EARLY["animals"]))
    f = finding(effect_table(EARLY), "first_half_vs_control")
    assert f["value"] == pytest.approx(np.mean(med) - ctl)
    assert f["present"] and 0 < f["ci_low"] <= f["value"] <= f["ci_high"]
    # one control set: the bootstrap varies only the medical mean, within [min, max] of the sets
    assert min(med) - ctl - 1e-12 <= f["ci_low"] and f["ci_high"] <= max(med) - ctl + 1e-12
    assert f["where"] == f"medical {np.mean(med):.2f} (2 sets) vs control {ctl:.2f} (1 sets)"
    # a control set as early as the medical ones: "first half" holds, the contrast does not
    same = {**EARLY, "animals": EARLY["drugs"]}
    assert finding(effect_table(same), "first_half")["present"]
    f = finding(effect_table(same), "first_half_vs_control")
    assert not f["present"] and f["ci_low"] <= 0
    late = {s: {t: v[::-1] for t, v in techs.items()} for s, techs in EARLY.items()}
    f = finding(effect_table(late), "first_half_vs_control")
    assert f["value"] < 0 and not f["present"]
    f = finding(effect_table({"drugs": EARLY["drugs"]}), "first_half_vs_control")
    assert np.isnan(f["value"]) and not f["present"]
    assert f["detail"] == "needs combined maps of medical and control sets (1 medical, 0 control)"


# ---------------------------------------------------------------------------------------------
# The whole table


def test_synthetic_models_with_and_without_every_phenomenon():
    t = pd.concat(
        [
            synthetic_table("with", 10, phenomena=True, peak=0.3, control_peak=0.7),
            synthetic_table("without", 12, phenomena=False, peak=0.7, control_peak=0.3),
        ],
        ignore_index=True,
    )
    f = findings_table(t)
    assert len(f) == 2 * len(FINDINGS)
    present = f.pivot(index="finding", columns="model", values="present")
    assert present["with"].all(), f[f["model"] == "with"]
    assert not present["without"].any(), f[f["model"] == "without"]
    w = f[f["model"] == "with"].set_index("finding")
    # synthetic_table puts the age jump at depth 0.5 (layer 5 of 10) and the collapse there too
    assert "layer 5 " in w.loc["age_discontinuity", "where"]
    assert "age 17→18" in w.loc["age_discontinuity", "where"]
    assert "layer 5 " in w.loc["collapse_recover", "where"]
    assert f["rule"].str.len().gt(0).all()


def test_missing_data_gives_nan_and_absent():
    t = effect_table({"drugs": EARLY["drugs"]})
    f = findings_table(t).set_index("finding")
    for name in ("age_discontinuity", "progression_circularity", "specialty_vs_mechanism"):
        assert np.isnan(f.loc[name, "value"]) and not f.loc[name, "present"]
        assert f.loc[name, "detail"].startswith("no ")
    assert not f.loc["collapse_recover", "present"]
    assert f.loc["first_half", "present"]


# ---------------------------------------------------------------------------------------------
# The paper's Table 1 and interval map


def test_paper_table_best_layer_and_null():
    from medmap.analysis.findings import paper_table

    sil = np.array([0.0, 0.05, 0.1, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0])
    r = rows("silhouette_umap30", sil, cset="drugs", label="specialty", technique="umap", half=0.02)
    r += rows("silhouette_umap30", sil / 2, cset="drugs", label="mechanism", technique="umap")
    r += rows("silhouette_umap30_perm_null", np.full(N + 1, -0.01), cset="drugs",
              label="specialty", technique="umap", lo=np.full(N + 1, -0.05),
              hi=np.full(N + 1, 0.03))  # fmt: skip
    r2 = np.linspace(0.2, 0.9, N + 1)
    r += rows("probe_r2", r2, cset="ages", label="age", technique="probe")
    t1 = paper_table(make_rows(r)).set_index("concept")
    assert set(t1.index) == {"drugs by specialty", "drugs by mechanism", "age R²"}
    spec = t1.loc["drugs by specialty"]
    assert spec["best_layer"] == 3 and spec["value"] == pytest.approx(0.3)
    assert (spec["null_ci_low"], spec["null_ci_high"]) == pytest.approx((-0.05, 0.03))
    assert np.isnan(t1.loc["drugs by mechanism", "null_value"])
    assert t1.loc["age R²", "best_layer"] == N and t1.loc["age R²", "value"] == pytest.approx(0.9)


def test_paper_intervals_rules():
    from medmap.analysis.findings import _smooth, paper_intervals, runs_above

    v = np.array([0, 0, 5, 6, 0, 0, 7, 8, 9, 0, 0, 4, 0], float)
    # 75th percentile of v is 5.25: runs 3..3 (too short), 6..8; 2..3 has a 5 below it
    assert runs_above(v) == [(6, 8, pytest.approx(8.0))]
    step = np.where(LAYERS >= 5, 0.4, 0.0)  # the silhouette jumps between layers 4 and 5
    r = rows("silhouette_umap30", step, cset="drugs", label="specialty", technique="umap")
    les = np.zeros(N)
    les[[1, 2]] = [3.0, 3.0]
    les[[5, 6, 7]] = [1.0, 2.0, 1.0]
    r += rows("delta_nll", les, cset="drugs", technique="lesion", layers=BLOCKS, window=1)
    iv = paper_intervals(make_rows(r))
    rep = iv[iv.technique == "representation"].iloc[0]
    s = _smooth(step)
    i = int(np.argmax(s[2:] - s[:-2]))
    assert (rep["layer_start"], rep["layer_end"]) == (i, i + 2) and i in (3, 4)
    lesion = iv[iv.technique == "lesion"]
    sl = _smooth(les)
    want = runs_above(sl)
    assert [(a + 1, b + 1) for a, b, _ in want] == list(zip(lesion.layer_start, lesion.layer_end))
    assert 1 <= len(lesion) <= 3 and (lesion.layer_end - lesion.layer_start >= 1).all()
