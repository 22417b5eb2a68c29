"""The paper's phenomena as numbers with confidence intervals, one findings table per model.

Each row: ``model, finding, value, ci_low, ci_high, where, present, rule, detail``. The rules
(thresholds are the module constants below; ``docs/knowledge-map.md`` explains them):

- ``age_discontinuity``: the largest token-count-controlled ``age_jump_ratio`` over layers
  (largest step between consecutive ages / median step), where = the age and layer; present if
  the ratio's CI lower bound exceeds :data:`JUMP_RATIO_MIN` (the jump is more than twice a
  typical step).
- ``progression_circularity``: the largest mean ``progression_circularity`` over layers; present
  if it exceeds :data:`CIRCULARITY_MIN` and the mean ``progression_monotonicity`` at that layer
  is below :data:`MONOTONICITY_MAX`.
- ``specialty_vs_mechanism``: over the middle layers (relative depth in :data:`MIDDLE`), the
  mean of the chance-corrected ``specialty_minus_mechanism_purity_excess`` (or the plain
  ``..._purity`` when absent); CI = mean of the per-layer CI bounds; present ("specialty") if
  the per-layer CI lies above 0 in more than half of the middle layers.
- ``collapse_recover``: the minimum over intermediate layers of the relative effective rank
  (``effective_rank`` / its maximum over layers, averaged over concept sets); present if more
  than half of the concept sets have ``collapse_recover == 1``.
- ``first_half``: fraction of the combined knowledge map's effect mass in the first half of the
  model, averaged over the medical concept sets; CI = percentile bootstrap over the
  per-technique first-half fractions of the medical sets; present if the value exceeds 0.5.
- ``first_half_vs_control``: the same fraction, medical sets minus control (non-medical) sets:
  is medical knowledge processed earlier than general knowledge, or does every set put its
  effect in the first half? CI = two-sample percentile bootstrap over the concept sets;
  present if the CI lies above 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from medmap.causal.summary import specificity_ci
from medmap.maps import MEDICAL_SETS, TECHNIQUES, KnowledgeMap, knowledge_map
from medmap.stats import bootstrap_ci

JUMP_RATIO_MIN = 2.0
CIRCULARITY_MIN = 0.5
MONOTONICITY_MAX = 0.8
MIDDLE = (0.25, 0.75)
FIRST_HALF_MIN = 0.5
FINDINGS: tuple[str, ...] = (
    "age_discontinuity",
    "progression_circularity",
    "specialty_vs_mechanism",
    "collapse_recover",
    "first_half",
    "first_half_vs_control",
)
COLUMNS = ["model", "finding", "value", "ci_low", "ci_high", "where", "present", "rule", "detail"]

RULES = {
    "age_discontinuity": f"CI low of max controlled age_jump_ratio > {JUMP_RATIO_MIN:g}",
    "progression_circularity": (
        f"max mean circularity > {CIRCULARITY_MIN:g} and monotonicity there < {MONOTONICITY_MAX:g}"
    ),
    "specialty_vs_mechanism": (
        f"CI of specialty−mechanism above 0 in > half of the layers at depth "
        f"{MIDDLE[0]:g}–{MIDDLE[1]:g}"
    ),
    "collapse_recover": "collapse_recover == 1 in > half of the concept sets",
    "first_half": f"combined-map effect fraction in the first half > {FIRST_HALF_MIN:g}",
    "first_half_vs_control": "CI of medical − control first-half fraction above 0",
}


def _fmt(x: float, nd: int = 2) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def _depth(row) -> str:
    return f"layer {int(row['layer'])} (depth {_fmt(row['relative_depth'])})"


def _row(model: str, finding: str, value=np.nan, lo=np.nan, hi=np.nan, where="", present=False,
         detail="") -> dict:  # fmt: skip
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
    }


def _metric(t: pd.DataFrame, metric: str, label: str | None = None) -> pd.DataFrame:
    g = t[(t["technique"] == "phenomenon") & (t["metric"] == metric) & (t["layer"] >= 0)]
    if label is not None:
        g = g[g["label"] == label]
    return g.dropna(subset=["value"])


def age_discontinuity(t: pd.DataFrame, model: str) -> dict:
    g = _metric(t, "age_jump_ratio")
    if g.empty:
        return _row(model, "age_discontinuity", detail="no age_jump_ratio rows")
    best = g.loc[g["value"].idxmax()]
    at = _metric(t, "age_jump_at")
    at = at[(at["layer"] == best["layer"]) & (at["concept_set"] == best["concept_set"])]
    age = f"age {at['value'].iloc[0]:g}" if len(at) else "age ?"
    if len(at) and "age_from" in at.columns and pd.notna(at["age_from"].iloc[0]):
        age = f"age {float(at['age_from'].iloc[0]):g}→{at['value'].iloc[0]:g}"
    lo = best["ci_low"] if pd.notna(best["ci_low"]) else best["value"]
    return _row(
        model,
        "age_discontinuity",
        best["value"],
        best["ci_low"],
        best["ci_high"],
        f"{age}, {_depth(best)}",
        lo > JUMP_RATIO_MIN,
        f"concept set {best['concept_set']}",
    )


def progression_circularity(t: pd.DataFrame, model: str) -> dict:
    g = _metric(t, "progression_circularity", "mean")
    if g.empty:
        return _row(model, "progression_circularity", detail="no progression_circularity rows")
    best = g.loc[g["value"].idxmax()]
    mono = _metric(t, "progression_monotonicity", "mean")
    mono = mono[(mono["layer"] == best["layer"]) & (mono["concept_set"] == best["concept_set"])]
    m = float(mono["value"].iloc[0]) if len(mono) else np.nan
    present = best["value"] > CIRCULARITY_MIN and (np.isfinite(m) and m < MONOTONICITY_MAX)
    return _row(
        model,
        "progression_circularity",
        best["value"],
        best["ci_low"],
        best["ci_high"],
        _depth(best),
        present,
        f"monotonicity there {_fmt(m)}",
    )


def specialty_vs_mechanism(t: pd.DataFrame, model: str) -> dict:
    g = _metric(t, "specialty_minus_mechanism_purity_excess")
    name = "purity_excess"
    if g.empty:
        g, name = _metric(t, "specialty_minus_mechanism_purity"), "purity"
    if g.empty:
        return _row(model, "specialty_vs_mechanism", detail="no specialty_minus_mechanism rows")
    g = g.groupby("layer", as_index=False).agg(
        value=("value", "mean"),
        ci_low=("ci_low", "mean"),
        ci_high=("ci_high", "mean"),
        relative_depth=("relative_depth", "first"),
    )
    pos = g["ci_low"] > 0
    neg = g["ci_high"] < 0
    mid = g[(g["relative_depth"] >= MIDDLE[0]) & (g["relative_depth"] <= MIDDLE[1])]
    if mid.empty:
        mid = g
    m_pos, m_neg = int((mid["ci_low"] > 0).sum()), int((mid["ci_high"] < 0).sum())
    sign = "specialty" if m_pos > len(mid) / 2 else "mechanism" if m_neg > len(mid) / 2 else "mixed"
    return _row(
        model,
        "specialty_vs_mechanism",
        mid["value"].mean(),
        mid["ci_low"].mean(),
        mid["ci_high"].mean(),
        f"{sign}: CI > 0 at {m_pos}/{len(mid)} middle layers, < 0 at {m_neg}",
        sign == "specialty",
        f"metric specialty_minus_mechanism_{name}; CI excludes 0 at "
        f"{int((pos | neg).sum())}/{len(g)} layers ({int(pos.sum())} above, {int(neg.sum())} below)",
    )


def collapse_recover(t: pd.DataFrame, model: str) -> dict:
    er = t[(t["technique"] == "geometry") & (t["metric"] == "effective_rank") & (t["layer"] >= 0)]
    flags = t[(t["metric"] == "collapse_recover")].dropna(subset=["value"])
    n_sets, n_flag = flags["concept_set"].nunique(), int((flags["value"] >= 0.5).sum())
    detail = f"collapse_recover = 1 in {n_flag}/{n_sets} concept sets"
    if er.empty:
        return _row(model, "collapse_recover", present=n_sets and n_flag > n_sets / 2,
                    detail=detail + "; no effective_rank rows")  # fmt: skip
    parts = []
    for _, g in er.groupby("concept_set"):
        mx = g["value"].max()
        if not mx > 0:
            continue
        parts.append(
            g.assign(rel=g["value"] / mx, rel_lo=g["ci_low"] / mx, rel_hi=g["ci_high"] / mx)
        )
    prof = (
        pd.concat(parts)
        .groupby("layer", as_index=False)
        .agg(
            rel=("rel", "mean"),
            rel_lo=("rel_lo", "mean"),
            rel_hi=("rel_hi", "mean"),
            relative_depth=("relative_depth", "first"),
        )
    )
    inner = prof[(prof["layer"] > prof["layer"].min()) & (prof["layer"] < prof["layer"].max())]
    if inner.empty:
        inner = prof
    best = inner.loc[inner["rel"].idxmin()]
    return _row(
        model,
        "collapse_recover",
        best["rel"],
        best["rel_lo"],
        best["rel_hi"],
        f"min relative effective rank at {_depth(best)}",
        n_sets > 0 and n_flag > n_sets / 2,
        detail,
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
    return _row(
        model,
        "first_half",
        value,
        lo,
        hi,
        f"{len(comb)} medical concept sets",
        value > FIRST_HALF_MIN,
        f"per technique: {techs}",
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
    :data:`medmap.maps.MEDICAL_SETS`. A finding without data has NaN value and ``present`` False
    (``detail`` says what was missing).
    """
    med = set(MEDICAL_SETS if medical is None else medical)
    if kmap is None:
        kmap = knowledge_map(table, medical=med)
    rows = []
    for model, t in table.groupby("model", sort=False):
        model = str(model)
        rows += [
            age_discontinuity(t, model),
            progression_circularity(t, model),
            specialty_vs_mechanism(t, model),
            collapse_recover(t, model),
            first_half(kmap, model, med, seed),
            first_half_vs_control(kmap, model, med, seed),
        ]
    return pd.DataFrame(rows, columns=COLUMNS)
