"""The paper's phenomena as numbers with confidence intervals and nulls, one table per model.

Each row: ``model, finding, value, ci_low, ci_high, where, present, rule, detail`` and, since
issue 16, ``null_value, null_ci_low, null_ci_high`` (the null's mean and 95 % range, computed in
the same run by :mod:`medmap.techniques.representation.detectors`), ``control_set,
control_value, control_ci_low, control_ci_high`` (the same detector on the matched non-medical
set, ``control_for`` in the concept files, e.g. years for ages) and ``stability`` (split-half
reliability of the detector's layer profile over disjoint template halves, Spearman–Brown
corrected) with ``unstable`` (stability < :data:`STABLE_MIN`).

A finding is ``present`` only when its CI lies beyond the null's range and, where a control
exists, beyond the control's CI (``detail`` says which held). "At some layer" means at
:data:`MIN_RUN` (3) consecutive layers: every layer is a test, and over ~30 layers one or two
clear a 95 % null by chance. A table without null rows (a map
from before the nulls existed) claims nothing. Rules (constants below; docs/detectors.md):

- ``age_discontinuity``: per layer, the token-count-controlled ``age_jump_ratio`` of a medical
  set against ``age_jump_ratio_smooth_null`` (smoothed age curve + permuted residuals) and the
  control set's ratio at that layer; present if at some layer CI low > :data:`JUMP_RATIO_MIN`,
  > the null's 97.5 % and > the control's CI high. Reported: the passing layer with the largest
  ratio, else the largest ratio.
- ``age_break_17_18``: the a-priori test of the paper's break: the 17→18 step's percentile
  among the equal-token-count steps (``age_step_percentile``) and the same step over the median
  step (``age_step_ratio``), each against its smooth null; present if at some layer either CI
  lies above its null's range (the percentile caps at 1, the ratio does not).
- ``progression_circularity``: value = the closed-tour ratio (``progression_tour_ratio``: the
  closed stage path's length over S × mean pair distance; 1 in random order); present if at
  some layer its CI lies below the stage-order permutation null's range (the stage order is
  encoded as a smooth loop or line), the mean circularity's CI low exceeds
  :data:`CIRCULARITY_MIN` and its CI high is not below circularity's permutation null (the path
  returns: an ordered open path is less circular than its points in random order; a circle is
  as closed as a random order of its points), and the monotonicity is below
  :data:`MONOTONICITY_MAX`. Circularity itself is reported against its permutation null, the
  template-noise floor and the 2-D UMAP's circularity in ``detail``: its floor is
  ≈ 1 − 1/(S − 1) for points in any order, so it cannot be the test.
- ``specialty_vs_mechanism``: per layer, ``specialty_minus_mechanism_purity_excess`` against
  its label-permutation null; over the middle layers (relative depth in :data:`MIDDLE`) present
  ("specialty") if the CI lies above the null's range in more than half of them.
- ``specialty_vs_mechanism_umap30``: the paper's metric, silhouette by specialty − by mechanism
  on a 30-d UMAP, against its label-permutation null; same rule.
- ``collapse_recover``: per concept set, ``collapse_recover == 1`` with its CI (both ends of the
  ``collapse_ratio`` CI below the fraction); present if more than half of the medical sets
  collapse. Its null is the control sets: ``control_value`` = their mean ``collapse_ratio``, and
  when more than half of them collapse too, ``detail`` reports a property of the model, not of
  medicine. (A layer-order permutation null was tried and rejected: random orders of the same
  ranks put the minimum in the intermediate layers most of the time and give the same ratio.)
- ``first_half``: fraction of the combined knowledge map's effect mass in the first half of the
  model, averaged over the medical concept sets; CI = percentile bootstrap over the
  per-technique first-half fractions of the medical sets; present if the value exceeds 0.5;
  ``control_value`` = the control sets' mean fraction.
- ``first_half_vs_control``: the same fraction, medical sets minus control (non-medical) sets;
  CI = two-sample percentile bootstrap over the concept sets; present if the CI lies above 0.

:func:`paper_table` and :func:`paper_intervals` give the paper's own figures (its Table 1 and
interval map) from the same results rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from medmap.analysis.maps import MEDICAL_SETS, TECHNIQUES, KnowledgeMap, knowledge_map
from medmap.analysis.stats import bootstrap_ci
from medmap.techniques.summary import specificity_ci

JUMP_RATIO_MIN = 2.0
CIRCULARITY_MIN = 0.5
MONOTONICITY_MAX = 0.8
MIDDLE = (0.25, 0.75)
FIRST_HALF_MIN = 0.5
STABLE_MIN = 0.5
# "at some layer" means at MIN_RUN consecutive layers: each layer is a test at the 2.5 % level,
# so over ~30 layers one or two pass by chance (measured: the 17→18 step of SmolLM2 cleared its
# null at 2 isolated layers of 31), while a real effect persists across neighbouring layers
MIN_RUN = 3
A_PRIORI_AGE = (17, 18)
FINDINGS: tuple[str, ...] = (
    "age_discontinuity",
    "age_break_17_18",
    "progression_circularity",
    "specialty_vs_mechanism",
    "specialty_vs_mechanism_umap30",
    "collapse_recover",
    "first_half",
    "first_half_vs_control",
)
COLUMNS = [
    "model", "finding", "value", "ci_low", "ci_high", "where", "present", "rule", "detail",
    "null_value", "null_ci_low", "null_ci_high",
    "control_set", "control_value", "control_ci_low", "control_ci_high",
    "stability", "unstable",
]  # fmt: skip
# the bundled controls (``control_for`` in the concept files); a table's own sets are read from
# their files when they can be (:func:`control_sets`)
CONTROL_FOR = {
    "years": "ages",
    "occupations": "symptoms",
    "countries": "diseases",
    "animals": "drugs",
}

RULES = {
    "age_discontinuity": (
        f"CI low of controlled age_jump_ratio > {JUMP_RATIO_MIN:g}, > smooth null's 97.5 % and > "
        "control's CI high, at some layer"
    ),
    "age_break_17_18": (
        "CI of the 17→18 step's percentile (or step ratio) above its smooth null's range, at some "
        "layer"
    ),
    "progression_circularity": (
        "closed-tour ratio CI below the stage-order permutation null, circularity CI low > "
        f"{CIRCULARITY_MIN:g} and monotonicity < {MONOTONICITY_MAX:g}, at some layer"
    ),
    "specialty_vs_mechanism": (
        "purity-excess CI above its label-permutation null in > half of the layers at depth "
        f"{MIDDLE[0]:g}–{MIDDLE[1]:g}"
    ),
    "specialty_vs_mechanism_umap30": (
        "30-d UMAP silhouette difference CI above its label-permutation null in > half of the "
        f"layers at depth {MIDDLE[0]:g}–{MIDDLE[1]:g}"
    ),
    "collapse_recover": (
        "collapse_recover == 1 (its CI too) in > half of the medical sets; the control sets are "
        "the null"
    ),
    "first_half": f"combined-map effect fraction in the first half > {FIRST_HALF_MIN:g}",
    "first_half_vs_control": "CI of medical − control first-half fraction above 0",
}
NO_NULL = "no null rows in this table (rerun the map): not claimed"


def _fmt(x: float, nd: int = 2) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def _rng_s(lo: float, hi: float) -> str:
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


def _depth(row) -> str:
    return f"layer {int(row['layer'])} (depth {_fmt(row['relative_depth'])})"


def _row(model: str, finding: str, value=np.nan, lo=np.nan, hi=np.nan, where="", present=False,
         detail="", null=(np.nan, np.nan, np.nan), control=("", np.nan, np.nan, np.nan),
         stability=np.nan) -> dict:  # fmt: skip
    stab = float(stability)
    unstable = bool(np.isfinite(stab) and stab < STABLE_MIN)
    if unstable:
        detail = f"{detail}; UNSTABLE (split-half reliability {_fmt(stab)})"
    return {
        "model": model,
        "finding": finding,
        "value": float(value),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "where": where,
        "present": bool(present),
        "rule": RULES[finding],
        "detail": detail,
        "null_value": float(null[0]),
        "null_ci_low": float(null[1]),
        "null_ci_high": float(null[2]),
        "control_set": str(control[0] or ""),
        "control_value": float(control[1]),
        "control_ci_low": float(control[2]),
        "control_ci_high": float(control[3]),
        "stability": stab,
        "unstable": unstable,
    }


def _metric(t: pd.DataFrame, metric: str, label: str | None = None, technique="phenomenon"):
    g = t[(t["technique"] == technique) & (t["metric"] == metric) & (t["layer"] >= 0)]
    if label is not None:
        g = g[g["label"] == label]
    return g.dropna(subset=["value"])


def _by_layer(g: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """``layer`` → ``{prefix}value, {prefix}lo, {prefix}hi`` (first row per layer)."""
    g = g.drop_duplicates("layer")
    return pd.DataFrame(
        {
            "layer": g["layer"].to_numpy(),
            f"{prefix}value": g["value"].to_numpy(float),
            f"{prefix}lo": g["ci_low"].to_numpy(float),
            f"{prefix}hi": g["ci_high"].to_numpy(float),
        }
    )


def _lo(df: pd.DataFrame, prefix: str = "") -> pd.Series:
    """CI low, or the value where the CI is missing."""
    return df[f"{prefix}lo"].fillna(df[f"{prefix}value"])


def _hi(df: pd.DataFrame, prefix: str = "") -> pd.Series:
    return df[f"{prefix}hi"].fillna(df[f"{prefix}value"])


def _run_ok(ok: pd.Series, layers: pd.Series) -> pd.Series:
    """``ok`` restricted to runs of at least :data:`MIN_RUN` consecutive layers."""
    order = np.argsort(layers.to_numpy())
    v = ok.to_numpy(bool)[order]
    lay = layers.to_numpy()[order]
    keep = np.zeros(len(v), dtype=bool)
    i = 0
    while i < len(v):
        if not v[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(v) and v[j + 1] and lay[j + 1] == lay[j] + 1:
            j += 1
        if j - i + 1 >= MIN_RUN:
            keep[i : j + 1] = True
        i = j + 1
    out = np.zeros(len(v), dtype=bool)
    out[order] = keep
    return pd.Series(out, index=ok.index)


def _stability(t: pd.DataFrame, metric: str, label: str, cset: str) -> float:
    g = t[
        (t["technique"] == "stability")
        & (t["metric"] == f"{metric}_split_half")
        & (t["label"] == label)
        & (t["concept_set"] == cset)
    ].dropna(subset=["value"])
    return float(g["value"].iloc[0]) if len(g) else float("nan")


def control_sets(sets: Iterable[str]) -> dict[str, str]:
    """``{medical set: its control set}`` among ``sets`` (``control_for`` of each control)."""
    sets = [str(x) for x in sets]
    out = {}
    for name in sets:
        target = CONTROL_FOR.get(name)
        if target is None:
            try:
                from medmap.concepts import load_concepts

                target = load_concepts(name).control_for
            except Exception:  # a set that is not bundled nor a readable file: no control
                target = None
        if target and target in sets:
            out[str(target)] = name
    return out


def _merged(t: pd.DataFrame, cset: str, label: str, metric: str, null_metric: str) -> pd.DataFrame:
    """Per layer: the estimate (``value, lo, hi``) with its null (``null_value, null_lo, ...``)."""
    tt = t[t["concept_set"] == cset]
    est = _by_layer(_metric(tt, metric, label), "")
    est = est.merge(t[["layer", "relative_depth"]].drop_duplicates("layer"), on="layer", how="left")
    null = _metric(tt, null_metric, label)
    if null.empty:
        return est.assign(null_value=np.nan, null_lo=np.nan, null_hi=np.nan)
    return est.merge(_by_layer(null, "null_"), on="layer", how="left")


def age_discontinuity(t: pd.DataFrame, model: str, medical: set[str] | None = None) -> dict:
    controls = control_sets(t["concept_set"].unique())
    sets = [s for s in t["concept_set"].unique() if medical is None or s in medical]
    sets = [s for s in sets if len(_metric(t[t["concept_set"] == s], "age_jump_ratio", "age"))]
    if not sets:
        return _row(model, "age_discontinuity", detail="no age_jump_ratio rows")
    cset = sets[0]
    m = _merged(t, cset, "age", "age_jump_ratio", "age_jump_ratio_smooth_null")
    ctl = controls.get(cset)
    if ctl is not None:
        c = _metric(t[t["concept_set"] == ctl], "age_jump_ratio")
        m = m.merge(_by_layer(c, "c_"), on="layer", how="left")
    else:
        m = m.assign(c_value=np.nan, c_lo=np.nan, c_hi=np.nan)
    has_null = m["null_hi"].notna().any()
    beyond_null = _lo(m) > m["null_hi"]
    beyond_ctl = m["c_hi"].isna() | (_lo(m) > _hi(m, "c_"))
    ok = _run_ok((_lo(m) > JUMP_RATIO_MIN) & beyond_null & beyond_ctl, m["layer"])
    best = m.loc[m.loc[ok, "value"].idxmax()] if ok.any() else m.loc[m["value"].idxmax()]
    at = _metric(t[t["concept_set"] == cset], "age_jump_at", "age")
    at = at[at["layer"] == best["layer"]]
    age = f"age {at['value'].iloc[0]:g}" if len(at) else "age ?"
    if len(at) and "age_from" in at.columns and pd.notna(at["age_from"].iloc[0]):
        age = f"age {float(at['age_from'].iloc[0]):g}→{at['value'].iloc[0]:g}"
    detail = (
        f"concept set {cset}; beyond the smooth null at {int(beyond_null.sum())}/{len(m)} layers, "
        f"beyond null and control at {int((beyond_null & beyond_ctl & m['c_hi'].notna()).sum())}"
    )
    if ctl is None:
        detail += "; no control set in this table"
    if not has_null:
        detail += "; " + NO_NULL
    return _row(
        model,
        "age_discontinuity",
        best["value"],
        best["lo"],
        best["hi"],
        f"{age}, {_depth(best)}",
        bool(ok.any()),
        detail,
        null=(best["null_value"], best["null_lo"], best["null_hi"]),
        control=(ctl or "", best["c_value"], best["c_lo"], best["c_hi"]),
        stability=_stability(t, "age_jump_ratio", "age", cset),
    )


def age_break_17_18(t: pd.DataFrame, model: str, medical: set[str] | None = None) -> dict:
    sets = [s for s in t["concept_set"].unique() if medical is None or s in medical]
    sets = [s for s in sets if len(_metric(t[t["concept_set"] == s], "age_step_percentile"))]
    if not sets:
        return _row(
            model, "age_break_17_18", detail="no age_step_percentile rows (" + NO_NULL + ")"
        )
    cset = sets[0]
    p = _merged(t, cset, "age", "age_step_percentile", "age_step_percentile_smooth_null")
    r = _merged(t, cset, "age", "age_step_ratio", "age_step_ratio_smooth_null")
    r = r[["layer", "value", "lo", "hi", "null_value", "null_lo", "null_hi"]].add_prefix("r_")
    m = p.merge(r.rename(columns={"r_layer": "layer"}), on="layer", how="left")
    ok_p = _lo(m) > m["null_hi"]
    ok_r = m["r_lo"].fillna(m["r_value"]) > m["r_null_hi"]
    ok = _run_ok(ok_p | ok_r, m["layer"])
    margin = (m["r_lo"].fillna(m["r_value"]) - m["r_null_hi"]).fillna(-np.inf)
    best = m.loc[margin.idxmax()] if np.isfinite(margin).any() else m.loc[m["value"].idxmax()]
    frm = _metric(t[t["concept_set"] == cset], "age_step_percentile", "age")
    frm = frm[frm["layer"] == best["layer"]]
    step = "17→18"
    if len(frm) and "age_from" in frm.columns and pd.notna(frm["age_from"].iloc[0]):
        step = f"{float(frm['age_from'].iloc[0]):g}→18"
    return _row(
        model,
        "age_break_17_18",
        best["value"],
        best["lo"],
        best["hi"],
        f"step {step}, {_depth(best)}",
        bool(ok.any()),
        f"concept set {cset}; percentile above its null at {int(ok_p.sum())}/{len(m)} layers, "
        f"step ratio above its null at {int(ok_r.sum())}; step ratio here {_fmt(best['r_value'])} "
        f"{_rng_s(best['r_lo'], best['r_hi'])} vs null {_rng_s(best['r_null_lo'], best['r_null_hi'])}",
        null=(best["null_value"], best["null_lo"], best["null_hi"]),
    )


def progression_circularity(t: pd.DataFrame, model: str) -> dict:
    g = _metric(t, "progression_circularity", "mean")
    if g.empty:
        return _row(model, "progression_circularity", detail="no progression_circularity rows")
    cset = str(g["concept_set"].iloc[0])
    tour = _merged(t, cset, "mean", "progression_tour_ratio", "progression_tour_ratio_perm_null")
    circ = _merged(t, cset, "mean", "progression_circularity", "progression_circularity_perm_null")
    circ = circ[["layer", "value", "lo", "hi", "null_value", "null_lo", "null_hi"]]
    m = circ.add_prefix("c_").rename(columns={"c_layer": "layer"})
    mono = _by_layer(_metric(t[t["concept_set"] == cset], "progression_monotonicity", "mean"), "m_")
    floor = _by_layer(
        _metric(t[t["concept_set"] == cset], "progression_circularity_noise_floor", "mean"), "f_"
    )
    um = _by_layer(
        _metric(t[t["concept_set"] == cset], "progression_circularity_umap", "mean"), "u_"
    )
    un = _by_layer(
        _metric(t[t["concept_set"] == cset], "progression_umap_circularity_perm_null", "mean"),
        "un_",
    )
    ut = _by_layer(
        _metric(t[t["concept_set"] == cset], "progression_umap_tour_ratio", "mean"), "ut_"
    )
    utn = _by_layer(
        _metric(t[t["concept_set"] == cset], "progression_umap_tour_ratio_perm_null", "mean"),
        "utn_",
    )
    if tour.empty:
        tour = circ[["layer"]].assign(
            value=np.nan, lo=np.nan, hi=np.nan, null_value=np.nan, null_lo=np.nan, null_hi=np.nan
        )
        tour = tour.merge(t[["layer", "relative_depth"]].drop_duplicates("layer"), on="layer")
    for extra in (m, mono, floor, um, un, ut, utn):
        tour = tour.merge(extra, on="layer", how="left")
    m = tour
    ordered = _hi(m) < m["null_lo"]
    # it returns: circularity above the threshold and not below what random stage orders give
    # (an ordered open path, a line, is *less* circular than its own points in random order)
    returns = (m["c_lo"].fillna(m["c_value"]) > CIRCULARITY_MIN) & ~(
        m["c_hi"].fillna(m["c_value"]) < m["c_null_lo"]
    )
    nonmono = m["m_value"] < MONOTONICITY_MAX
    ok = _run_ok(ordered & returns & nonmono, m["layer"])
    best = m.loc[m.loc[ok, "c_value"].idxmax()] if ok.any() else m.loc[m["c_value"].idxmax()]
    umap_ok = (
        (m["ut_value"] < m["utn_lo"])
        & (m["u_value"] > CIRCULARITY_MIN)
        & (m["u_value"] >= m["un_lo"])
    )
    detail = (
        f"circularity {_fmt(best['c_value'])} {_rng_s(best['c_lo'], best['c_hi'])} vs its "
        f"permutation null {_rng_s(best['c_null_lo'], best['c_null_hi'])} and noise floor "
        f"{_rng_s(best['f_lo'], best['f_hi'])}; monotonicity {_fmt(best['m_value'])}; "
        f"order encoded at {int(ordered.sum())}/{len(m)} layers, returns at {int(returns.sum())}, "
        f"all conditions at {int((ordered & returns & nonmono).sum())} ({int(ok.sum())} in runs of "
        f">= {MIN_RUN}); 2-D UMAP: circularity {_fmt(best['u_value'])} (null "
        f"{_rng_s(best['un_lo'], best['un_hi'])}), tour ratio {_fmt(best['ut_value'])} (null "
        f"{_rng_s(best['utn_lo'], best['utn_hi'])}), circular by the same rule at "
        f"{int(umap_ok.sum())} layers"
    )
    if not m["null_lo"].notna().any():
        detail += "; " + NO_NULL
    return _row(
        model,
        "progression_circularity",
        best["value"],
        best["lo"],
        best["hi"],
        _depth(best),
        bool(ok.any()),
        detail,
        null=(best["null_value"], best["null_lo"], best["null_hi"]),
        stability=_stability(t, "progression_tour_ratio", "mean", cset),
    )


def _middle_rule(m: pd.DataFrame) -> tuple[pd.DataFrame, int, int, str]:
    mid = m[(m["relative_depth"] >= MIDDLE[0]) & (m["relative_depth"] <= MIDDLE[1])]
    if mid.empty:
        mid = m
    above = _lo(mid) > mid["null_hi"]
    below = _hi(mid) < mid["null_lo"]
    n_pos, n_neg = int(above.sum()), int(below.sum())
    sign = "specialty" if n_pos > len(mid) / 2 else "mechanism" if n_neg > len(mid) / 2 else "mixed"
    return mid, n_pos, n_neg, sign


def _contrast_finding(t, model, finding, metric, null_metric, stab_metric) -> dict:
    g = _metric(t, metric)
    if g.empty:
        return _row(model, finding, detail=f"no {metric} rows")
    cset, label = str(g["concept_set"].iloc[0]), str(g["label"].iloc[0])
    m = _merged(t, cset, label, metric, null_metric)
    mid, n_pos, n_neg, sign = _middle_rule(m)
    detail = (
        f"metric {metric} on {cset}; CI beyond the null at {n_pos + n_neg}/{len(mid)} middle layers"
    )
    if not m["null_hi"].notna().any():
        detail += "; " + NO_NULL
    return _row(
        model,
        finding,
        mid["value"].mean(),
        mid["lo"].mean(),
        mid["hi"].mean(),
        f"{sign}: above the null at {n_pos}/{len(mid)} middle layers, below at {n_neg}",
        sign == "specialty",
        detail,
        null=(mid["null_value"].mean(), mid["null_lo"].mean(), mid["null_hi"].mean()),
        stability=_stability(t, stab_metric, label, cset) if stab_metric else np.nan,
    )


def specialty_vs_mechanism(t: pd.DataFrame, model: str) -> dict:
    return _contrast_finding(
        t,
        model,
        "specialty_vs_mechanism",
        "specialty_minus_mechanism_purity_excess",
        "specialty_minus_mechanism_purity_excess_perm_null",
        "specialty_minus_mechanism_purity",
    )


def specialty_vs_mechanism_umap30(t: pd.DataFrame, model: str) -> dict:
    return _contrast_finding(
        t,
        model,
        "specialty_vs_mechanism_umap30",
        "specialty_minus_mechanism_silhouette_umap30",
        "specialty_minus_mechanism_silhouette_umap30_perm_null",
        None,
    )


def _collapsed_sets(t: pd.DataFrame) -> dict[str, bool]:
    """Per concept set: collapse_recover == 1 with the whole ``collapse_ratio`` CI below the
    flag's fraction (0.5), i.e. the flag's own CI is 1 at both ends."""
    flags = t[t["metric"] == "collapse_recover"].dropna(subset=["value"])
    out = {}
    for _, f in flags.iterrows():
        lo, hi = f["ci_low"], f["ci_high"]
        sure = (lo >= 0.5 and hi >= 0.5) if pd.notna(lo) and pd.notna(hi) else f["value"] >= 0.5
        out[str(f["concept_set"])] = bool(f["value"] >= 0.5 and sure)
    return out


def collapse_recover(t: pd.DataFrame, model: str, medical: set[str] | None = None) -> dict:
    er = t[(t["technique"] == "geometry") & (t["metric"] == "effective_rank") & (t["layer"] >= 0)]
    flags = _collapsed_sets(t)
    med = {s: f for s, f in flags.items() if medical is None or s in medical}
    ctl = {s: f for s, f in flags.items() if medical is not None and s not in medical}
    n_med, k_med = len(med), sum(med.values())
    n_ctl, k_ctl = len(ctl), sum(ctl.values())
    present = n_med > 0 and k_med > n_med / 2
    detail = f"collapse_recover = 1 (CI too) in {k_med}/{n_med} medical sets"
    detail += f", {k_ctl}/{n_ctl} control sets" if n_ctl else ", no control sets"
    if present and n_ctl and k_ctl > n_ctl / 2:
        detail += ": a property of the model (the control sets collapse too), not of medicine"
    elif present and n_ctl:
        detail += ": specific to the medical sets"
    ratio = t[(t["metric"] == "collapse_ratio") & t["concept_set"].isin(list(med))]
    c_ratio = t[(t["metric"] == "collapse_ratio") & t["concept_set"].isin(list(ctl))]
    where = ""
    if not er.empty:
        parts = []
        for _, g in er.groupby("concept_set"):
            mx = g["value"].max()
            if mx > 0:
                parts.append(g.assign(rel=g["value"] / mx))
        if parts:
            prof = (
                pd.concat(parts)
                .groupby("layer", as_index=False)
                .agg(rel=("rel", "mean"), relative_depth=("relative_depth", "first"))
            )
            lay = prof["layer"]
            inner = prof[(lay > lay.min()) & (lay < lay.max())]
            inner = prof if inner.empty else inner
            where = f"min relative effective rank at {_depth(inner.loc[inner['rel'].idxmin()])}"

    def mean(g, col):
        return g[col].mean() if len(g) else np.nan

    # the null of a collapse is the same profile on the control sets (no other null: the ratio
    # is a property of the rank values more than of their layer order)
    return _row(
        model,
        "collapse_recover",
        mean(ratio, "value"),
        mean(ratio, "ci_low"),
        mean(ratio, "ci_high"),
        where,
        present,
        detail,
        control=(
            ",".join(sorted(ctl)),
            mean(c_ratio, "value"),
            mean(c_ratio, "ci_low"),
            mean(c_ratio, "ci_high"),
        ),
    )


def first_half(kmap: KnowledgeMap, model: str, medical: set[str], seed: int = 0) -> dict:
    s = kmap.summary[kmap.summary["model"] == model]
    comb = s[(s["map"] == "combined") & s["concept_set"].isin(medical)]["first_half_fraction"]
    comb = comb.dropna()
    if comb.empty:
        return _row(model, "first_half", detail="no combined map of a medical concept set")
    per_tech = s[s["map"].isin(TECHNIQUES) & s["concept_set"].isin(medical)]
    per_tech = per_tech.groupby("map")["first_half_fraction"].mean().dropna()
    value = float(comb.mean())
    if len(per_tech) >= 2:
        _, lo, hi = bootstrap_ci(per_tech.to_numpy(), seed=seed)
    else:
        lo = hi = value
    techs = ", ".join(f"{k} {_fmt(v)}" for k, v in per_tech.items())
    ctl = s[(s["map"] == "combined") & ~s["concept_set"].isin(medical)]["first_half_fraction"]
    ctl = ctl.dropna()
    return _row(
        model,
        "first_half",
        value,
        lo,
        hi,
        f"{len(comb)} medical concept sets",
        value > FIRST_HALF_MIN,
        f"per technique: {techs}",
        control=("controls", ctl.mean() if len(ctl) else np.nan, np.nan, np.nan),
    )


def first_half_vs_control(kmap: KnowledgeMap, model: str, medical: set[str], seed: int = 0) -> dict:
    s = kmap.summary[(kmap.summary["model"] == model) & (kmap.summary["map"] == "combined")]
    s = s.dropna(subset=["first_half_fraction"])
    med = s[s["concept_set"].isin(medical)]["first_half_fraction"].to_numpy()
    ctl = s[~s["concept_set"].isin(medical)]["first_half_fraction"].to_numpy()
    if len(med) == 0 or len(ctl) == 0:
        return _row(
            model,
            "first_half_vs_control",
            detail=f"needs combined maps of medical and control sets ({len(med)} medical, "
            f"{len(ctl)} control)",
        )
    value, lo, hi = specificity_ci(med, ctl, n_boot=1000, seed=seed)
    return _row(
        model,
        "first_half_vs_control",
        value,
        lo,
        hi,
        f"medical {_fmt(med.mean())} ({len(med)} sets) vs control {_fmt(ctl.mean())} "
        f"({len(ctl)} sets)",
        lo > 0,
        "two-sample bootstrap over concept sets",
        null=(0.0, np.nan, np.nan),
        control=("controls", float(ctl.mean()), np.nan, np.nan),
    )


def findings_table(
    table: pd.DataFrame,
    kmap: KnowledgeMap | None = None,
    *,
    medical: Iterable[str] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Findings of every model in ``table`` (columns :data:`COLUMNS`, one row per finding).

    ``kmap`` defaults to ``knowledge_map(table)``; ``medical`` to
    :data:`medmap.analysis.maps.MEDICAL_SETS`. A finding without data has NaN value and
    ``present`` False (``detail`` says what was missing).
    """
    med = set(MEDICAL_SETS if medical is None else medical)
    if kmap is None:
        kmap = knowledge_map(table, medical=med)
    rows = []
    for model, t in table.groupby("model", sort=False):
        model = str(model)
        rows += [
            age_discontinuity(t, model, med),
            age_break_17_18(t, model, med),
            progression_circularity(t, model),
            specialty_vs_mechanism(t, model),
            specialty_vs_mechanism_umap30(t, model),
            collapse_recover(t, model, med),
            first_half(kmap, model, med, seed),
            first_half_vs_control(kmap, model, med, seed),
        ]
    return pd.DataFrame(rows, columns=COLUMNS)


# ---------------------------------------------------------------------------------------------
# The paper's own figures: its Table 1 (best layer and score per concept) and interval map

PAPER_CONCEPTS: tuple[tuple[str, str, str | None, str, str, str | None], ...] = (
    # (concept, concept set, label (None = every label scored), technique, metric, null metric)
    ("age R²", "ages", "age", "probe", "probe_r2", None),
    ("age local anisotropy", "ages", "age", "phenomenon", "age_local_anisotropy", None),
    ("symptoms", "symptoms", None, "umap", "silhouette_umap30", "silhouette_umap30_perm_null"),
    ("diseases", "diseases", None, "umap", "silhouette_umap30", "silhouette_umap30_perm_null"),
    ("drugs by mechanism", "drugs", "mechanism", "umap", "silhouette_umap30",
     "silhouette_umap30_perm_null"),
    ("drugs by specialty", "drugs", "specialty", "umap", "silhouette_umap30",
     "silhouette_umap30_perm_null"),
    ("dosages patching efficacy", "dosages", "", "patching", "restored", None),
)  # fmt: skip
PAPER_TABLE_COLUMNS = [
    "model", "concept", "concept_set", "label", "technique", "metric", "best_layer",
    "relative_depth", "value", "ci_low", "ci_high", "null_value", "null_ci_low", "null_ci_high",
    "baseline", "n_layers_scored",
]  # fmt: skip


def paper_table(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 from results rows: per model and concept, the best layer and score.

    Concepts (:data:`PAPER_CONCEPTS`): age R² (``probe_r2``) and local anisotropy
    (``age_local_anisotropy``: 1 − λ2/λ1 over each item's 20 nearest neighbours); the silhouette
    on a 30-d UMAP (``silhouette_umap30``) for symptoms and diseases (one row per label) and for
    drugs by mechanism and by specialty, with their label-permutation null at the best layer;
    patching efficacy for dosages (``restored`` of denoising patching, the paper's
    ``(LD_patched − LD_corrupt) / (LD_clean − LD_corrupt)``; :func:`~medmap.analysis.maps.select_rows`
    picks the position). A concept without rows is left out.
    """
    from medmap.analysis.maps import select_rows

    out = []
    for model, t in table.groupby("model", sort=False):
        for concept, cset, label, tech, metric, null_metric in PAPER_CONCEPTS:
            g = t[(t["concept_set"] == cset) & (t["layer"] >= 0)]
            if tech == "patching":
                g = select_rows(g, "patching")
            g = g[(g["technique"] == tech) & (g["metric"] == metric)].dropna(subset=["value"])
            if g.empty:
                continue
            labels = [label] if label is not None else list(dict.fromkeys(g["label"]))
            for lab in labels:
                gl = g if tech == "patching" else g[g["label"] == lab]
                if gl.empty:
                    continue
                prof = gl.groupby("layer", as_index=False).agg(
                    value=("value", "mean"),
                    ci_low=("ci_low", "mean"),
                    ci_high=("ci_high", "mean"),
                    baseline=("baseline", "mean"),
                    relative_depth=("relative_depth", "first"),
                )
                best = prof.loc[prof["value"].idxmax()]
                null = (np.nan, np.nan, np.nan)
                if null_metric is not None:
                    nr = t[(t["concept_set"] == cset) & (t["metric"] == null_metric)]
                    nr = nr[(nr["label"] == lab) & (nr["layer"] == best["layer"])]
                    if len(nr):
                        null = tuple(float(nr[c].iloc[0]) for c in ("value", "ci_low", "ci_high"))
                name = concept if label is not None or len(labels) == 1 else f"{concept} by {lab}"
                out.append(
                    {
                        "model": str(model),
                        "concept": name,
                        "concept_set": cset,
                        "label": str(lab),
                        "technique": tech,
                        "metric": metric,
                        "best_layer": int(best["layer"]),
                        "relative_depth": float(best["relative_depth"]),
                        "value": float(best["value"]),
                        "ci_low": float(best["ci_low"]),
                        "ci_high": float(best["ci_high"]),
                        "null_value": null[0],
                        "null_ci_low": null[1],
                        "null_ci_high": null[2],
                        "baseline": float(best["baseline"]),
                        "n_layers_scored": int(len(prof)),
                    }
                )
    return pd.DataFrame(out, columns=PAPER_TABLE_COLUMNS)


INTERVAL_COLUMNS = [
    "model", "concept_set", "technique", "interval", "layer_start", "layer_end", "depth_start",
    "depth_end", "score", "rule",
]  # fmt: skip


def _smooth(v: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(np.asarray(v, float), sigma, mode="nearest")


def runs_above(v: np.ndarray, q: float = 75, min_len: int = 2, max_runs: int = 3):
    """``[(start, stop_inclusive, mean)]`` of the runs of ``v`` above its ``q``-th percentile,
    at least ``min_len`` long, the ``max_runs`` with the largest mean value (in layer order)."""
    thr = np.nanpercentile(v, q)
    runs, i = [], 0
    while i < len(v):
        if v[i] > thr:
            j = i
            while j + 1 < len(v) and v[j + 1] > thr:
                j += 1
            if j - i + 1 >= min_len:
                runs.append((i, j, float(np.mean(v[i : j + 1]))))
            i = j + 1
        else:
            i += 1
    runs = sorted(runs, key=lambda r: -r[2])[:max_runs]
    return sorted(runs)


def paper_intervals(table: pd.DataFrame, *, sigma: float = 1.0) -> pd.DataFrame:
    """The paper's interval map from results rows, per model, concept set and technique.

    Every profile is first smoothed over layers with a Gaussian (``sigma`` = 1 layer).
    Representation: the 3-layer window of fastest rise of the silhouette (``silhouette_umap30``
    averaged over labels; for a set without it, e.g. ages, the representation map's probe
    score, ``probe_r2`` or ``probe_acc``): the window
    ``[l, l + 2]`` maximising ``s(l + 2) − s(l)``. Causal techniques (saliency, lesion,
    patching; the rows of :func:`~medmap.analysis.maps.select_rows`, averaged over labels):
    runs above the profile's 75th percentile, at least 2 layers long, at most 3 per technique
    (the 3 with the largest mean).
    """
    from medmap.analysis.maps import select_rows

    out = []
    for model, t in table.groupby("model", sort=False):
        t = t[t["layer"] >= 0]
        for cset, tc in t.groupby("concept_set", sort=False):
            sil = tc[(tc["technique"] == "umap") & (tc["metric"] == "silhouette_umap30")]
            rep = sil if len(sil) else select_rows(tc, "representation")
            if len(rep):
                prof = rep.groupby("layer")["value"].mean().sort_index()
                depth = rep.groupby("layer")["relative_depth"].first().reindex(prof.index)
                s = _smooth(prof.to_numpy(), sigma)
                if len(s) >= 3:
                    rise = s[2:] - s[:-2]
                    i = int(np.nanargmax(rise))
                    lay = prof.index.to_numpy()
                    out.append(
                        [str(model), str(cset), "representation", 0, int(lay[i]),
                         int(lay[i + 2]), float(depth.iloc[i]), float(depth.iloc[i + 2]),
                         float(rise[i]), f"fastest 3-layer rise of smoothed {rep['metric'].iloc[0]}"]
                    )  # fmt: skip
            for tech in ("saliency", "lesion", "patching"):
                r = select_rows(tc, tech)
                if tech == "lesion" and "label" in r.columns:
                    r = r[r["label"].astype(str) == ""]
                if r.empty:
                    continue
                prof = r.groupby("layer")["value"].mean().sort_index()
                depth = r.groupby("layer")["relative_depth"].first().reindex(prof.index)
                s = _smooth(prof.to_numpy(), sigma)
                lay = prof.index.to_numpy()
                for k, (a, b, score) in enumerate(runs_above(s)):
                    out.append(
                        [str(model), str(cset), tech, k, int(lay[a]), int(lay[b]),
                         float(depth.iloc[a]), float(depth.iloc[b]), score,
                         "smoothed run above the 75th percentile, >= 2 layers, <= 3 runs"]
                    )  # fmt: skip
    return pd.DataFrame(out, columns=INTERVAL_COLUMNS)


def write_paper_outputs(table: pd.DataFrame, run_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write ``paper_table.parquet`` and ``paper_intervals.parquet`` into ``run_dir``."""
    from medmap.run.outputs import write_parquet_atomic
    from medmap.run.rundir import Run

    run = Run(run_dir)
    t1, iv = paper_table(table), paper_intervals(table)
    write_parquet_atomic(t1, run.paper_table)
    write_parquet_atomic(iv, run.paper_intervals)
    return t1, iv
