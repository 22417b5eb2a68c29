"""Findings table: every phenomenon PRESENT on a table built to have it, ABSENT on one built
without it. Expected values are derived in the tests from the constructed inputs (geometry of
toy embeddings, the rules of docs/detectors.md), not copied from the implementation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from medmap.findings import (
    CIRCULARITY_MIN,
    FINDINGS,
    JUMP_RATIO_MIN,
    MONOTONICITY_MAX,
    findings_table,
)
from medmap.maps import knowledge_map
from medmap.report.synthetic import synthetic_table
from medmap.results import make_rows

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


def age_ratio(jump: float) -> tuple[float, float, float]:
    """1-D toy age code z(a) = a + jump·[a >= 18]: ``(ratio, age_from, age_to)`` by the
    detector's definition (largest step between consecutive ages / median step)."""
    z = AGES + jump * (AGES >= 18)
    steps = np.abs(np.diff(z))
    j = int(np.argmax(steps))
    return float(steps.max() / np.median(steps)), float(AGES[j]), float(AGES[j + 1])


def age_table(jumps: list[float], half: float = 0.5) -> pd.DataFrame:
    ratios = [age_ratio(j)[0] for j in jumps]
    at = [age_ratio(j)[2] for j in jumps]
    frm = [age_ratio(j)[1] for j in jumps]
    r = rows("age_jump_ratio", ratios, cset="ages", label="age", half=half)
    for row, f in zip(rows("age_jump_at", at, cset="ages", label="age"), frm):
        r.append(row | {"age_from": f})
    return make_rows(r)


def test_age_discontinuity_present_and_where():
    jumps = [0.0, 0.0, 1.0, 4.0, 2.0, 0.5, 0.0, 0.0, 0.0]  # the code jumps most at layer 3
    t = age_table(jumps)
    ratios = np.array([age_ratio(j)[0] for j in jumps])
    k = int(np.argmax(ratios))
    assert k == 3 and ratios[k] == pytest.approx(5.0)  # step 1 + 4 over median step 1
    assert ratios[k] - 0.5 > JUMP_RATIO_MIN  # constructed to clear the rule
    f = finding(t, "age_discontinuity")
    assert f["present"]
    assert f["value"] == pytest.approx(ratios[k])
    assert (f["ci_low"], f["ci_high"]) == pytest.approx((ratios[k] - 0.5, ratios[k] + 0.5))
    _, a_from, a_to = age_ratio(jumps[k])
    assert (a_from, a_to) == (17, 18)
    assert f"age {a_from:g}→{a_to:g}" in f["where"]
    assert f"layer {k} " in f["where"] and f"{k / N:.2f}" in f["where"]


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


def test_age_discontinuity_without_ci_uses_the_value():
    ratios = [age_ratio(j)[0] for j in [0, 0, 0, 3.0, 0, 0, 0, 0, 0]]  # 4.0 at layer 3
    t = make_rows(rows("age_jump_ratio", ratios, cset="ages", label="age"))
    f = finding(t, "age_discontinuity")
    assert f["present"] and np.isnan(f["ci_low"]) and "age ?" in f["where"]


# ---------------------------------------------------------------------------------------------
# Progression circularity


def path_scores(p: np.ndarray) -> tuple[float, float]:
    """``(circularity, monotonicity)`` of a stage path by the definitions in docs/detectors.md."""
    steps = np.linalg.norm(np.diff(p, axis=0), axis=1).sum()
    circ = 1 - np.linalg.norm(p[-1] - p[0]) / steps
    c = p - p.mean(0)
    pc1 = np.linalg.svd(c, full_matrices=False)[2][0]
    mono = abs(spearmanr(np.arange(len(p)), c @ pc1).statistic)
    return float(circ), float(mono)


S = 8
STAGE = np.arange(S)
LINE = np.stack([STAGE, np.zeros(S)], 1).astype(float)  # straight, in stage order
ELLIPSE = np.stack([2 * np.cos(2 * np.pi * STAGE / S), np.sin(2 * np.pi * STAGE / S)], 1)
ZIGZAG = np.stack([STAGE, 4.0 * (STAGE % 2)], 1).astype(float)  # long path, monotone drift


def progression_table(paths: list[np.ndarray]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    scores = np.array([path_scores(p) for p in paths])
    circ, mono = scores[:, 0], scores[:, 1]
    r = rows("progression_circularity", circ, cset="progression", label="mean", half=0.05)
    r += rows("progression_monotonicity", mono, cset="progression", label="mean", half=0.05)
    # per-series rows must not be mistaken for the mean
    r += rows("progression_circularity", np.full(N + 1, 0.99), cset="progression", label="s1")
    return make_rows(r), circ, mono


def blend(w: float) -> np.ndarray:
    return (1 - w) * LINE + w * ELLIPSE


def test_progression_circularity_present():
    weights = [0.0, 0.1, 0.3, 0.6, 1.0, 0.8, 0.4, 0.1, 0.0]  # a closed loop at layer 4
    t, circ, mono = progression_table([blend(w) for w in weights])
    k = int(np.argmax(circ))
    assert k == 4
    # 8 points on a circle: the closing chord is one of 8 equal sides -> 1 - 1/7 (0.86)
    circle = np.stack([np.cos(2 * np.pi * STAGE / S), np.sin(2 * np.pi * STAGE / S)], 1)
    assert path_scores(circle)[0] == pytest.approx(1 - 1 / 7)
    assert circ[k] > CIRCULARITY_MIN and mono[k] < MONOTONICITY_MAX
    assert circ[0] == pytest.approx(0.0) and mono[0] == pytest.approx(1.0)  # straight line
    f = finding(t, "progression_circularity")
    assert f["present"]
    assert f["value"] == pytest.approx(circ[k])
    assert (f["ci_low"], f["ci_high"]) == pytest.approx((circ[k] - 0.05, circ[k] + 0.05))
    assert f"layer {k} " in f["where"]
    assert f"{mono[k]:.2f}" in f["detail"]


def test_progression_circularity_absent():
    # straight paths: circularity 0, monotonicity 1
    t, circ, mono = progression_table([LINE] * (N + 1))
    f = finding(t, "progression_circularity")
    assert not f["present"] and f["value"] == pytest.approx(0.0)
    # a long zig-zag path is "circular" by path length but still progresses monotonically
    t, circ, mono = progression_table([LINE] * 4 + [ZIGZAG] + [LINE] * 4)
    assert circ[4] > CIRCULARITY_MIN and mono[4] >= MONOTONICITY_MAX
    f = finding(t, "progression_circularity")
    assert not f["present"] and f["value"] == pytest.approx(circ[4])
    # circular but the monotonicity at that layer is unknown: not claimed
    t, circ, _ = progression_table([blend(1.0)] * (N + 1))
    t = t[t["metric"] != "progression_monotonicity"]
    assert not finding(t, "progression_circularity")["present"]


# ---------------------------------------------------------------------------------------------
# Specialty vs mechanism


MIDDLE_LAYERS = LAYERS[(DEPTH >= 0.25) & (DEPTH <= 0.75)]  # 2..6


def spec_table(values, half=0.08, metric="specialty_minus_mechanism_purity_excess"):
    return make_rows(rows(metric, values, cset="drugs", label="specialty-mechanism", half=half))


def expected_spec(values, half=0.08):
    v = np.asarray(values, float)[MIDDLE_LAYERS]
    pos, neg = int((v - half > 0).sum()), int((v + half < 0).sum())
    sign = "specialty" if pos > len(v) / 2 else "mechanism" if neg > len(v) / 2 else "mixed"
    return v.mean(), pos, neg, sign


@pytest.mark.parametrize(
    ("values", "sign"),
    [
        # specialty in 3 of the 5 middle layers; outer layers lean to mechanism (ignored)
        ([-0.2, -0.1, 0.1, 0.2, 0.3, 0.05, -0.1, -0.2, -0.3], "specialty"),
        ([0.2, 0.1, -0.1, -0.2, -0.3, -0.05, 0.1, 0.2, 0.3], "mechanism"),
        ([0.3, 0.3, 0.2, 0.2, -0.2, -0.2, 0.0, 0.3, 0.3], "mixed"),
    ],
)
def test_specialty_vs_mechanism_sign_by_layer(values, sign):
    mean, pos, neg, expected_sign = expected_spec(values)
    assert len(MIDDLE_LAYERS) == 5 and expected_sign == sign
    f = finding(spec_table(values), "specialty_vs_mechanism")
    assert f["present"] == (sign == "specialty")
    assert f["value"] == pytest.approx(mean)
    assert (f["ci_low"], f["ci_high"]) == pytest.approx((mean - 0.08, mean + 0.08))
    assert f["where"].startswith(f"{sign}: CI > 0 at {pos}/5 middle layers, < 0 at {neg}")
    # over all 9 layers
    v = np.asarray(values)
    assert f"({int((v - 0.08 > 0).sum())} above, {int((v + 0.08 < 0).sum())} below)" in f["detail"]


def test_specialty_vs_mechanism_excess_preferred_and_purity_fallback():
    spec = [0.0, 0.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0]
    mech = [-v for v in spec]
    # plain purity says specialty, the chance-corrected excess says mechanism: excess wins
    t = pd.concat(
        [spec_table(spec, metric="specialty_minus_mechanism_purity"), spec_table(mech)],
        ignore_index=True,
    )
    f = finding(t, "specialty_vs_mechanism")
    assert not f["present"] and f["where"].startswith("mechanism")
    assert "purity_excess" in f["detail"]
    f = finding(
        spec_table(spec, metric="specialty_minus_mechanism_purity"), "specialty_vs_mechanism"
    )
    assert f["present"] and f["value"] == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------
# Collapse and recovery


def bump(depth, centre, width):
    return np.exp(-0.5 * ((depth - centre) / width) ** 2)


U_SHAPE = 10 - 8 * bump(DEPTH, 0.5, 0.12)  # collapses mid-depth, recovers
FLAT = np.full(N + 1, 10.0)
DECLINE = 10 - 8 * DEPTH  # falls and never recovers


def collapse_flag(r: np.ndarray) -> int:
    """The detector's rule (docs/detectors.md): min over intermediate layers below half of both
    the early maximum (depth <= 0.25) and the last layer's value."""
    early = DEPTH <= 0.25
    layers = LAYERS
    inner = (layers > layers[early].max()) & (layers < layers[-1])
    ratio = r[inner].min() / min(r[early].max(), r[-1])
    return int(ratio < 0.5)


def collapse_table(profiles: dict[str, np.ndarray]) -> pd.DataFrame:
    r = []
    for cset, prof in profiles.items():
        r += rows("effective_rank", prof, cset=cset, technique="geometry", half=0.5)
        r += rows("collapse_recover", [collapse_flag(prof)], cset=cset, layers=[-1])
    return make_rows(r)


def expected_collapse(profiles: dict[str, np.ndarray]) -> tuple[float, int]:
    rel = np.mean([p / p.max() for p in profiles.values()], axis=0)
    inner = rel[1:-1]
    return float(inner.min()), int(np.argmin(inner)) + 1


def test_collapse_recover_present():
    assert (collapse_flag(U_SHAPE), collapse_flag(FLAT), collapse_flag(DECLINE)) == (1, 0, 0)
    profiles = {"drugs": U_SHAPE, "ages": U_SHAPE * 1.5, "animals": FLAT}  # 2 of 3 collapse
    value, layer = expected_collapse(profiles)
    assert layer == 4
    f = finding(collapse_table(profiles), "collapse_recover")
    assert f["present"]
    assert f["value"] == pytest.approx(value)
    # CI: the rank's CI (±0.5) relative to each set's maximum, averaged over sets
    half = np.mean([0.5 / p.max() for p in profiles.values()])
    assert (f["ci_low"], f["ci_high"]) == pytest.approx((value - half, value + half))
    assert f"layer {layer} " in f["where"]
    assert "2/3 concept sets" in f["detail"]


@pytest.mark.parametrize(
    "profiles",
    [
        {"drugs": U_SHAPE, "ages": FLAT, "animals": DECLINE},  # 1 of 3
        {"drugs": U_SHAPE, "animals": DECLINE},  # exactly half is not "more than half"
        {"drugs": FLAT, "ages": DECLINE},
    ],
)
def test_collapse_recover_absent(profiles):
    value, _ = expected_collapse(profiles)
    f = finding(collapse_table(profiles), "collapse_recover")
    assert not f["present"]
    assert f["value"] == pytest.approx(value)
    n_flag = sum(collapse_flag(p) for p in profiles.values())
    assert f"{n_flag}/{len(profiles)} concept sets" in f["detail"]


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
