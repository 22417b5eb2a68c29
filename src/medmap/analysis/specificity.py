"""The specificity map: where a technique's effect on a medical set exceeds its control's.

The per-technique maps (:mod:`medmap.analysis.maps`) show each set's profile scaled to its own
peak, so a generic profile (every set peaks at block 1) looks like a finding. The specificity
map shows, per technique and layer, the medical set's effect **minus its matched control's**
(``control_for`` in the concept files: years for ages, occupations for symptoms, countries for
diseases, animals for drugs; a medical set without one is compared with the mean of the run's
control sets), on the technique's own scale:

==================  =========================================================================
map                 effect per layer (the row it is computed from, with its 95 % CI)
==================  =========================================================================
``representation``  probe score *gained* over the embedding layer: ``score(l) − score(0)`` of
                    ``probe_acc`` (categorical labels) or ``probe_r2``, averaged over a set's
                    labels (layer 0 holds the concept's own tokens, pitfall 11)
``saliency``        ``grad_x_weight_share`` of the block (margin objective where present)
``lesion``          ``specific_damage`` (margin loss beyond generic damage on neutral text;
                    ``delta_nll`` where a run has no margins)
``patching``        ``restored`` (denoising, first present position of concept, last, all)
``emergence``       ``lens_accuracy`` (logit lens: forced choice decoded at that layer)
==================  =========================================================================

The CI of a difference comes from the rows' bootstrap CIs by the normal approximation
(``se = (ci_high − ci_low) / 3.92``, independent sets; for the representation gain the layer-0
term is added as if independent, which is conservative since the two are positively
correlated). A cell whose CI contains 0 is **blank** (``value`` NaN in the normalised map,
``significant`` False). ``normalised`` = difference / the row's largest significant |difference|
(in [−1, 1]). The ``combined`` row of a set is the mean over the techniques present of
``max(0, normalised)`` (blank cells count 0), blank where no technique is significant.

Identical medical and control rows give a difference of exactly 0 and a blank map (tested).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from medmap.analysis.maps import lens_rows, select_rows, set_roles

TECHNIQUES = ("representation", "saliency", "lesion", "patching", "emergence")
COLUMNS = [
    "model", "map", "concept_set", "control_set", "layer", "relative_depth", "effect",
    "control_effect", "value", "ci_low", "ci_high", "significant", "normalised",
]  # fmt: skip
Z = 1.959963984540054
ALL_CONTROLS = "all controls"


def _se(lo: pd.Series, hi: pd.Series) -> pd.Series:
    return (hi - lo) / (2 * Z)


def effect_rows(table: pd.DataFrame, map_name: str) -> pd.DataFrame:
    """Per (model, concept set, layer): ``effect`` and its ``se`` for one technique (see the
    module docstring), from tidy results."""
    cols = ["model", "concept_set", "layer", "relative_depth", "effect", "se"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    if map_name == "representation":
        p = select_rows(table, "representation")
        p = p.assign(se=_se(p["ci_low"], p["ci_high"]))
        first = p[p["layer"] == 0][["model", "concept_set", "label", "value", "se"]]
        p = p.merge(first, on=["model", "concept_set", "label"], suffixes=("", "_0"))
        p = p.assign(gain=p["value"] - p["value_0"], se2=p["se"] ** 2 + p["se_0"] ** 2)
        g = p.groupby(["model", "concept_set", "layer", "relative_depth"], as_index=False).agg(
            effect=("gain", "mean"), se2=("se2", "sum"), k=("gain", "size")
        )
        g["se"] = np.sqrt(g["se2"]) / g["k"]
        return g[cols]
    if map_name == "emergence":
        t = table[(table["layer"] >= 0) & table["relative_depth"].notna()]
        s = lens_rows(t)
    elif map_name in ("saliency", "lesion", "patching"):
        s = select_rows(table, map_name)  # the rows the technique's map is built from
        s = s[s["label"].astype(str) == ""]  # block level (sub-module rows carry a site label)
    else:
        raise ValueError(f"unknown map {map_name!r}")
    s = s.assign(effect=s["value"], se=_se(s["ci_low"], s["ci_high"]))
    return s.groupby(["model", "concept_set", "layer", "relative_depth"], as_index=False)[
        ["effect", "se"]
    ].mean()[cols]


def matched_controls(sets: Iterable[str]) -> dict[str, str]:
    """``{medical set: its control}``: the control naming it in ``control_for``, else
    :data:`ALL_CONTROLS` (the mean of the run's control sets) when the run has any control."""
    from medmap.analysis.findings import control_sets

    sets = list(dict.fromkeys(str(s) for s in sets))
    roles = set_roles(sets)
    matched = control_sets(sets)
    out = {}
    for m in roles["medical"]:
        if m in matched:
            out[m] = matched[m]
        elif roles["control"]:
            out[m] = ALL_CONTROLS
    return out


def specificity_map(
    table: pd.DataFrame,
    *,
    pairs: dict[str, str] | None = None,
    controls: Iterable[str] | None = None,
) -> pd.DataFrame:
    """The specificity map of every model in ``table`` (see the module docstring).

    Args:
        table: tidy results.
        pairs: ``{medical set: control set}``; default :func:`matched_controls` of the table's
            sets. A value of :data:`ALL_CONTROLS` compares with the mean of ``controls``.
        controls: the control sets averaged for :data:`ALL_CONTROLS` (default: the table's sets
            with ``medical: false``).

    Returns:
        Long table with :data:`COLUMNS`: per (model, map, medical set, layer) the medical
        ``effect``, the ``control_effect``, ``value`` = their difference with ``ci_low`` /
        ``ci_high`` (95 %), ``significant`` (CI excludes 0) and ``normalised`` (NaN where not
        significant); ``map == "combined"`` rows carry only ``normalised``.
    """
    if table.empty:
        return pd.DataFrame(columns=COLUMNS)
    sets = table["concept_set"].astype(str).unique()
    pairs = matched_controls(sets) if pairs is None else dict(pairs)
    if controls is None:
        controls = set_roles(sets)["control"]
    controls = list(controls)
    parts = []
    for map_name in TECHNIQUES:
        eff = effect_rows(table, map_name)
        if eff.empty:
            continue
        key = ["model", "layer"]
        pooled = (
            eff[eff["concept_set"].isin(controls)]
            .groupby(key, as_index=False)
            .agg(
                effect=("effect", "mean"),
                se2=("se", lambda v: float((v**2).sum())),
                k=("se", "size"),
            )  # fmt: skip
        )
        pooled["se"] = np.sqrt(pooled["se2"]) / pooled["k"]
        for med, ctl in pairs.items():
            a = eff[eff["concept_set"] == med]
            b = pooled if ctl == ALL_CONTROLS else eff[eff["concept_set"] == ctl]
            if a.empty or b.empty:
                continue
            m = a.merge(b[[*key, "effect", "se"]], on=key, suffixes=("", "_c"))
            diff = m["effect"] - m["effect_c"]
            half = Z * np.sqrt(m["se"] ** 2 + m["se_c"] ** 2)
            parts.append(
                pd.DataFrame(
                    {
                        "model": m["model"],
                        "map": map_name,
                        "concept_set": med,
                        "control_set": ctl,
                        "layer": m["layer"].astype(int),
                        "relative_depth": m["relative_depth"],
                        "effect": m["effect"],
                        "control_effect": m["effect_c"],
                        "value": diff,
                        "ci_low": diff - half,
                        "ci_high": diff + half,
                    }
                )
            )
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    out = pd.concat(parts, ignore_index=True)
    out["significant"] = (out["ci_low"] > 0) | (out["ci_high"] < 0)
    sig = out["value"].where(out["significant"])
    scale = sig.abs().groupby([out["model"], out["map"], out["concept_set"]]).transform("max")
    out["normalised"] = sig / scale.where(scale > 0)
    comb = (
        out.assign(pos=out["normalised"].clip(lower=0).fillna(0.0), any=out["significant"])
        .groupby(["model", "concept_set", "control_set", "layer"], as_index=False)
        .agg(relative_depth=("relative_depth", "first"), pos=("pos", "mean"), any=("any", "any"))
    )
    comb = comb.assign(
        map="combined", normalised=comb["pos"].where(comb["any"]), significant=comb["any"]
    )
    for c in ("effect", "control_effect", "value", "ci_low", "ci_high"):
        comb[c] = np.nan
    out = pd.concat([out, comb[COLUMNS]], ignore_index=True)
    return (
        out[COLUMNS]
        .sort_values(["model", "map", "concept_set", "layer"], kind="stable")
        .reset_index(drop=True)
    )


def specificity_matrix(spec: pd.DataFrame, map_name: str, model: str) -> pd.DataFrame:
    """``(rows, depths)`` matrix of ``normalised`` values of one map of one model: index
    ``"<medical> − <control>"`` (in table order), columns relative depth (ascending); NaN =
    blank. Empty when the map has no row."""
    g = (
        spec[(spec["model"].astype(str) == model) & (spec["map"] == map_name)]
        if len(spec)
        else spec
    )
    if g.empty:
        return pd.DataFrame()
    rows = [f"{a} − {b}" for a, b in zip(g["concept_set"], g["control_set"])]
    m = g.assign(row=rows).pivot_table(
        index="row", columns="relative_depth", values="normalised", aggfunc="mean", dropna=False
    )
    return m.reindex(list(dict.fromkeys(rows))).sort_index(axis=1)


def specificity_summary(spec: pd.DataFrame) -> pd.DataFrame:
    """Per (model, map, medical set): the layers where the medical set's effect significantly
    exceeds its control's (``positive_layers``), the peak of that excess and the number of
    layers tested (``n_layers``)."""
    rows = []
    for (model, mp, cset, ctl), g in spec.groupby(
        ["model", "map", "concept_set", "control_set"], sort=False
    ):
        pos = g[g["significant"] & (g["normalised"] > 0)]
        peak = pos.loc[pos["normalised"].idxmax()] if len(pos) else None
        rows.append(
            {
                "model": model,
                "map": mp,
                "concept_set": cset,
                "control_set": ctl,
                "positive_layers": ",".join(str(int(x)) for x in pos["layer"]),
                "n_positive": len(pos),
                "peak_layer": int(peak["layer"]) if peak is not None else -1,
                "peak_depth": float(peak["relative_depth"]) if peak is not None else np.nan,
                "n_layers": len(g),
            }
        )
    return pd.DataFrame(rows)
