"""Knowledge maps: where along the depth of a model each technique finds each concept set.

A *map* is a matrix (concept set [and label]) × relative depth for one model and one technique,
each row normalised to a peak of 1 (see ``docs/knowledge-map.md``):

==================  =========================================================================
map                 row values before the per-row scaling
==================  =========================================================================
``representation``  probe score − shuffled-label baseline, clipped at 0 (``probe_acc`` for
                    categorical labels, else ``probe_r2``); one row per (concept set, label)
``saliency``        ``grad_x_weight_share`` of the whole block (``module == "block"``), of the
                    forced-choice margin (``objective == "margin"``) where it was taken
``lesion``          ``specific_damage`` (margin loss beyond what the generic damage on neutral
                    text predicts) of the smallest lesion window, clipped at 0; ``delta_nll``
                    for a set that has no margin rows
``patching``        information *transfer* across block l from denoising patching:
                    ``½[max(0, r_c(l-1) - r_c(l)) + max(0, r_t(l) - r_t(l-1))]`` where
                    ``r_c``/``r_t`` = ``restored`` (clipped to [0, 1]) patching the concept
                    tokens / the last token; one term if only one position was run
``emergence``       logit lens: rise of the forced-choice accuracy of the answer decoded from
                    the residual stream, ``max(0, a(l) − a(l−1))`` (not in ``combined``)
``combined``        mean over the four technique maps present at a cell (concept-set rows)
==================  =========================================================================

Lesion and patching rows of a sub-module site (``site`` ``attn`` or ``mlp``, runs with
``lesion_sites`` / ``patch_sites``) are extra rows labelled with the site ("drugs / attn"); the
``block`` rows keep an empty label, and only they enter the combined map and the contrast.

Every row is divided by its maximum (an all-zero row stays zero). For the combined map the
representation rows of one concept set are first averaged over labels and rescaled to peak 1,
so every technique enters with the same weight. Models of different depth align on
``relative_depth = layer / n_layers``; with ``n_bins`` the depths are averaged in equal bins.

Per row the summary figures are: the peak (layer and relative depth), the shortest contiguous
depth interval holding 50 % and 80 % of the row's effect mass, and the fraction of the mass in
the first half of the model (:func:`row_summary`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from medmap.analysis.results import make_rows
from medmap.analysis.stats import two_sample_ci

if TYPE_CHECKING:  # pragma: no cover
    from medmap.run.rundir import Run

# Display order of the bundled sets in the maps (medical first). Whether a set is medical or a
# control comes from its metadata (``ConceptSet.medical``), see :func:`set_roles`.
SET_ORDER: tuple[str, ...] = (
    "ages", "symptoms", "diseases", "progression", "drugs", "dosages",
    "countries", "animals", "occupations", "years",
)  # fmt: skip
TECHNIQUES: tuple[str, ...] = ("representation", "saliency", "lesion", "patching")
# the answer's emergence (logit lens) is a fifth view beside the four; it is not in the combined map
MAPS: tuple[str, ...] = (*TECHNIQUES, "emergence", "combined")
CONTRAST_SET = "medical-minus-control"
_KEY = ["model", "map", "concept_set", "label"]


@dataclass
class KnowledgeMap:
    """Normalised maps, their per-row summaries and the medical-minus-control contrast.

    Attributes:
        cells: long table, one row per (model, map, concept_set, label, relative_depth) with
            ``layer`` (-1 when binned), ``raw`` (the value before per-row scaling) and ``value``
            (normalised, in [0, 1]; NaN where the technique has no figure at that depth).
        summary: one row per (model, map, concept_set, label), see :func:`row_summary`.
        contrast: per (model, map, relative_depth): mean normalised value of the medical rows
            minus that of the control rows, with a 95 % two-sample bootstrap CI over sets.
        n_layers: blocks per model.
    """

    cells: pd.DataFrame
    summary: pd.DataFrame
    contrast: pd.DataFrame
    n_layers: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_tidy(cls, tidy: pd.DataFrame) -> KnowledgeMap:
        """The map back from its tidy rows (:meth:`tidy`, ``knowledge_map.parquet``); ``raw``
        is not stored there and is NaN."""
        cols = ["model", "map", "concept_set", "label", "layer", "relative_depth", "raw", "value"]
        if tidy.empty:
            empty = pd.DataFrame(columns=cols)
            return cls(empty, _summaries(empty, True), _contrast(empty, set(), set(), 1, 0))
        t = tidy.astype({"model": str, "map": str, "concept_set": str, "label": str})
        t["label"] = t["label"].replace({"<NA>": ""})
        eff = t["metric"] == "normalised_effect"
        con = eff & (t["concept_set"] == CONTRAST_SET)
        cells = t[eff & ~con].assign(raw=np.nan)[cols].reset_index(drop=True)
        cells["layer"] = cells["layer"].astype(int)
        figs: dict[tuple, dict[str, float]] = {}
        for r in t[t["metric"].isin(SUMMARY_FIGURES)].itertuples(index=False):
            figs.setdefault((r.model, r.map, r.concept_set, r.label), {})[r.metric] = r.value
        summary = pd.DataFrame(
            [dict(zip(_KEY, k)) | v for k, v in figs.items()], columns=[*_KEY, *SUMMARY_FIGURES]
        )
        ccols = ["model", "map", "layer", "relative_depth", "value", "ci_low", "ci_high", "n"]
        contrast = t[con][ccols].reset_index(drop=True)
        return cls(cells, summary, contrast)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(self.cells["model"])) if len(self.cells) else []

    def available(self, model: str | None = None) -> list[str]:
        """Map names (in :data:`MAPS` order) holding at least one cell for ``model``."""
        c = self.cells if model is None else self.cells[self.cells["model"] == model]
        present = set(c["map"])
        return [m for m in MAPS if m in present]

    def matrix(self, map_name: str, model: str | None = None) -> pd.DataFrame:
        """``(rows, depths)`` matrix of normalised values: index ``concept_set`` or
        ``concept_set / label``, columns relative depth (ascending)."""
        model = model or (self.models[0] if self.models else None)
        c = self.cells[(self.cells["map"] == map_name) & (self.cells["model"] == model)]
        if c.empty:
            return pd.DataFrame()
        rows = row_names(c)
        m = c.assign(row=rows).pivot_table(
            index="row", columns="relative_depth", values="value", aggfunc="mean", dropna=False
        )
        order = list(dict.fromkeys(rows))
        return m.reindex(order).sort_index(axis=1)

    def tidy(self) -> pd.DataFrame:
        """Tidy rows (technique ``map``, extra column ``map``): per-depth ``normalised_effect``,
        per-row summary figures (``layer = -1``) and the contrast (``concept_set`` =
        ``medical-minus-control``)."""
        rows: list[dict] = []
        for r in self.cells.itertuples(index=False):
            rows.append(
                _row(r.model, r.map, r.concept_set, r.label, "normalised_effect", r.value)
                | {"layer": int(r.layer), "relative_depth": float(r.relative_depth)}
            )
        for r in self.summary.to_dict("records"):
            for fig in SUMMARY_FIGURES:
                rows.append(_row(r["model"], r["map"], r["concept_set"], r["label"], fig, r[fig]))
        for r in self.contrast.itertuples(index=False):
            rows.append(
                _row(r.model, r.map, CONTRAST_SET, "", "normalised_effect", r.value)
                | {
                    "layer": int(r.layer),
                    "relative_depth": float(r.relative_depth),
                    "ci_low": r.ci_low,
                    "ci_high": r.ci_high,
                    "n": int(r.n),
                }
            )
        if not rows:
            return make_rows([]).assign(map=pd.Series(dtype="string"))
        out = make_rows(rows)
        out["map"] = out["map"].astype("string")
        return out


SUMMARY_FIGURES: tuple[str, ...] = (
    "peak_layer",
    "peak_depth",
    "depth50_low",
    "depth50_high",
    "depth50_span",
    "depth80_low",
    "depth80_high",
    "depth80_span",
    "first_half_fraction",
    "total_mass",
    "reliability",
    "unstable",
)
UNSTABLE_BELOW = 0.5  # split-half reliability under which a map row is flagged "unstable"


def _row(model, map_name, cset, label, metric, value) -> dict:
    return {
        "model": model,
        "layer": -1,
        "relative_depth": np.nan,
        "concept_set": cset,
        "technique": "map",
        "metric": metric,
        "label": label,
        "value": float(value) if value is not None else np.nan,
        "map": map_name,
    }


def row_names(c: pd.DataFrame) -> list[str]:
    """Display name of map rows: ``concept_set`` or ``concept_set / label``."""
    return [s if not lab else f"{s} / {lab}" for s, lab in zip(c["concept_set"], c["label"])]


# ---------------------------------------------------------------------------------------------
# Summary figures of one row


def shortest_interval(values: np.ndarray, fraction: float) -> tuple[int, int]:
    """Shortest contiguous index range ``[i, j]`` whose sum is >= ``fraction`` × total.

    ``values`` must be non-negative (NaN counts as 0). "Shortest" counts grid points; among
    equally short ranges the one with the larger mass wins, then the earliest. Returns
    ``(-1, -1)`` for a row without mass.
    """
    v = np.nan_to_num(np.asarray(values, dtype=float), nan=0.0)
    total = v.sum()
    if total <= 0:
        return -1, -1
    need = fraction * total * (1 - 1e-12)
    csum = np.concatenate([[0.0], np.cumsum(v)])
    n = len(v)
    for width in range(1, n + 1):
        sums = csum[width:] - csum[: n - width + 1]
        ok = np.flatnonzero(sums >= need)
        if ok.size:
            i = int(ok[np.argmax(sums[ok])])
            return i, i + width - 1
    return 0, n - 1


def first_half_fraction(depths: np.ndarray, values: np.ndarray) -> float:
    """Mass at relative depth < 0.5 (plus half the mass at exactly 0.5) / total mass."""
    d = np.asarray(depths, dtype=float)
    v = np.nan_to_num(np.asarray(values, dtype=float), nan=0.0)
    total = v.sum()
    if total <= 0:
        return float("nan")
    first = v[d < 0.5 - 1e-9].sum() + 0.5 * v[np.abs(d - 0.5) <= 1e-9].sum()
    return float(first / total)


def row_summary(depths, values, layers=None) -> dict[str, float]:
    """Summary figures of one map row (``values`` >= 0 on ascending ``depths``).

    - ``peak_layer`` / ``peak_depth``: layer and relative depth of the maximum (first one);
      ``peak_layer`` is -1 when the row is binned (``layers`` None).
    - ``depthXX_low`` / ``depthXX_high``: relative depths of the ends of the shortest
      contiguous run of grid points holding XX % of the row's mass (:func:`shortest_interval`);
      ``depthXX_span``: the number of those points / the number of points in the row.
    - ``first_half_fraction``: :func:`first_half_fraction`.
    - ``total_mass``: sum of the values.
    """
    d = np.asarray(depths, dtype=float)
    v = np.nan_to_num(np.asarray(values, dtype=float), nan=0.0)
    out: dict[str, float] = {k: float("nan") for k in SUMMARY_FIGURES}
    out["total_mass"] = float(v.sum())
    if len(v) == 0 or v.sum() <= 0:
        return out
    k = int(np.argmax(v))
    out["peak_depth"] = float(d[k])
    out["peak_layer"] = float(layers[k]) if layers is not None else -1.0
    for pct, frac in (("50", 0.5), ("80", 0.8)):
        i, j = shortest_interval(v, frac)
        out[f"depth{pct}_low"] = float(d[i])
        out[f"depth{pct}_high"] = float(d[j])
        out[f"depth{pct}_span"] = (j - i + 1) / len(v)
    out["first_half_fraction"] = first_half_fraction(d, v)
    return out


# ---------------------------------------------------------------------------------------------
# Building the maps


def _n_layers(table: pd.DataFrame) -> dict[str, int]:
    """Blocks per model, from ``layer / relative_depth`` of rows with depth > 0: only for tables
    whose run's manifest is not at hand (:func:`knowledge_map` takes ``n_layers``)."""
    out = {}
    for model, g in table.groupby("model", sort=False):
        g = g[(g["layer"] > 0) & (g["relative_depth"] > 0)]
        if g.empty:
            continue
        out[str(model)] = int(round(float(np.median(g["layer"] / g["relative_depth"]))))
    return out


def is_specificity(table: pd.DataFrame) -> pd.Series:
    """Rows comparing a medical set with its control (``techniques.summary.specificity_row``):
    a ``control_set`` is named (tables written before that column: metric ``specificity_*``)."""
    if "control_set" in table.columns:
        return table["control_set"].notna() & (table["control_set"].astype(str) != "")
    return table["metric"].astype(str).str.startswith("specificity_")


def select_rows(table: pd.DataFrame, map_name: str) -> pd.DataFrame:
    """The tidy rows a technique map is built from (unnormalised, with their CIs).

    ``representation``: ``probe_acc`` (categorical labels) or else ``probe_r2`` per (set, label);
    ``saliency``: ``grad_x_weight_share`` of ``module == "block"`` (margin objective where
    present); ``lesion``: ``specific_damage`` (else ``delta_nll``) of the smallest ``window``; ``patching``: ``restored`` with ``direction == "denoise"`` (if any)
    at the first present ``position`` of concept, last, all. Whole-model rows (``layer`` -1) and
    specificity rows (:func:`is_specificity`) are left out. ``label`` is "" except for
    representation.
    """
    if table.empty or "technique" not in table.columns:
        return table.iloc[0:0]
    t = table[(table["layer"] >= 0) & table["relative_depth"].notna()]
    t = t[~is_specificity(t)]
    if map_name == "representation":
        p = t[(t["technique"] == "probe") & t["metric"].isin(["probe_acc", "probe_r2"])]
        acc_keys = set(
            zip(*[p.loc[p["metric"] == "probe_acc", c] for c in ("model", "concept_set", "label")])
        )
        keep = [
            (m == "probe_acc") == ((mo, cs, lab) in acc_keys)
            for mo, cs, lab, m in zip(p["model"], p["concept_set"], p["label"], p["metric"])
        ]
        return p[np.asarray(keep, dtype=bool)]
    if map_name == "saliency":
        s = t[(t["technique"] == "saliency") & (t["metric"] == "grad_x_weight_share")]
        if "module" in s.columns:
            s = s[s["module"] == "block"]
        if "objective" in s.columns:  # the margin's gradient where it was taken
            s = _prefer(s, s["objective"].astype("string").fillna("nll") == "margin")
        return s.assign(label="")
    if map_name == "lesion":
        les = t[(t["technique"] == "lesion") & t["metric"].isin(["delta_nll", "specific_damage"])]
        if "window" in les.columns and les["window"].notna().any():
            les = les[les["window"] == les["window"].min()]
        les = _prefer(les, les["metric"] == "specific_damage")
        return les.assign(label=_site_labels(les))
    if map_name == "patching":
        pat = t[(t["technique"] == "patching") & (t["metric"] == "restored")]
        if "direction" in pat.columns and (pat["direction"] == "denoise").any():
            pat = pat[pat["direction"] == "denoise"]
        if "position" in pat.columns:
            for pos in ("concept", "last", "all"):
                if (pat["position"] == pos).any():
                    pat = pat[pat["position"] == pos]
                    break
        return pat.assign(label=_site_labels(pat))
    raise ValueError(f"unknown map {map_name!r}")


def _prefer(t: pd.DataFrame, better: pd.Series) -> pd.DataFrame:
    """Per (model, concept set) the ``better`` rows where it has any, else all its rows."""
    if t.empty:
        return t
    has = better.groupby([t["model"], t["concept_set"]]).transform("any")
    return t[better | ~has]


def _site_labels(t: pd.DataFrame) -> pd.Series | str:
    """Row label of lesion/patching rows: "" for ``site == "block"`` (or no site), else the site."""
    if "site" not in t.columns:
        return ""
    site = t["site"].astype("string").fillna("block")
    return site.where(site != "block", "").astype(str)


def _block_rows(cells: pd.DataFrame) -> pd.DataFrame:
    """Cells without the sub-module rows (lesion/patching rows with a site label)."""
    sub = cells["map"].isin(["lesion", "patching"]) & (cells["label"].astype(str) != "")
    return cells[~sub]


def patching_transfer(table: pd.DataFrame) -> pd.DataFrame:
    """Per (model, concept set, layer): where the answer-deciding information moves.

    ``restored`` at the concept tokens after block ``l`` is the share of the clean/corrupt
    difference still carried by the concept's residual stream there; its drop across block ``l``
    is what block ``l`` moved away from the concept. ``restored`` at the last token rises where
    the information arrives. ``raw(l) = mean of the present terms max(0, r_c(l-1) - r_c(l))``
    and ``max(0, r_t(l) - r_t(l-1))`` (``r`` clipped to [0, 1], denoising rows only); layer 0
    has no block before it and gets 0.
    """
    t = table[(table["layer"] >= 0) & (table["technique"] == "patching")]
    t = t[(t["metric"] == "restored") & ~is_specificity(t)]
    if "direction" in t.columns and (t["direction"] == "denoise").any():
        t = t[t["direction"] == "denoise"]
    if t.empty or "position" not in t.columns:
        return t.iloc[0:0].assign(raw=pd.Series(dtype=float))
    out = []
    t = t.assign(_label=_site_labels(t))
    for (model, cset, label), g in t.groupby(["model", "concept_set", "_label"], sort=False):
        per_pos = g.pivot_table(
            index=["layer", "relative_depth"], columns="position", values="value", aggfunc="mean"
        ).sort_index()
        terms = []
        for pos, sign in (("concept", -1.0), ("last", 1.0)):
            if pos in per_pos.columns:
                r = per_pos[pos].clip(0.0, 1.0)
                terms.append((sign * r.diff()).clip(lower=0.0).fillna(0.0))
        if not terms:
            continue
        raw = sum(terms) / len(terms)
        out.append(
            pd.DataFrame(
                {
                    "model": model,
                    "concept_set": cset,
                    "label": label,
                    "layer": [i[0] for i in raw.index],
                    "relative_depth": [i[1] for i in raw.index],
                    "raw": raw.to_numpy(),
                }
            )
        )
    if not out:
        return t.iloc[0:0].assign(raw=pd.Series(dtype=float))
    return pd.concat(out, ignore_index=True)


def lens_rows(table: pd.DataFrame, metric: str = "lens_accuracy", lens: str = "logit"):
    """Rows of ``metric`` of the logit-lens technique decoded through ``lens`` (``"logit"`` or
    ``"tuned"``; a table without a ``lens`` column holds logit-lens rows only)."""
    t = table[(table["technique"] == "logit_lens") & (table["metric"] == metric)]
    if "lens" in t.columns:
        t = t[t["lens"].astype("string").fillna("logit") == lens]
    elif lens != "logit":
        t = t.iloc[0:0]
    return t


def emergence_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Per (model, concept set, layer): where the right answer emerges under the logit lens,
    ``raw(l) = max(0, a(l) − a(l−1))`` with ``a`` = ``lens_accuracy`` (forced choice decoded
    from the residual stream after ``l`` blocks); layer 0 gets 0."""
    t = lens_rows(table[table["layer"] >= 0])
    if t.empty:
        return t.iloc[0:0].assign(raw=pd.Series(dtype=float), label="")
    out = []
    for (model, cset), g in t.groupby(["model", "concept_set"], sort=False):
        g = g.groupby(["layer", "relative_depth"], as_index=False)["value"].mean()
        g = g.sort_values("layer")
        raw = g["value"].diff().clip(lower=0.0).fillna(0.0)
        out.append(g.assign(model=model, concept_set=cset, label="", raw=raw.to_numpy()))
    return pd.concat(out, ignore_index=True)


def _raw_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Long ``model, map, concept_set, label, layer, relative_depth, raw`` before scaling."""
    cols = ["model", "map", "concept_set", "label", "layer", "relative_depth", "raw"]
    parts = []
    for name in TECHNIQUES:
        if name == "patching":
            r = patching_transfer(table) if not table.empty else pd.DataFrame()
            if not r.empty:
                parts.append(r.assign(map=name))
            continue
        r = select_rows(table, name)
        if r.empty:
            continue
        if name == "representation":
            raw = (r["value"] - r["baseline"].fillna(0.0)).clip(lower=0.0)
        else:
            raw = r["value"].clip(lower=0.0)
        parts.append(r.assign(map=name, raw=raw))
    em = emergence_rows(table) if not table.empty else pd.DataFrame()
    if not em.empty:
        parts.append(em.assign(map="emergence"))
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat([p[cols] for p in parts], ignore_index=True)
    for c in ("model", "map", "concept_set", "label"):
        out[c] = out[c].astype(str).replace({"<NA>": ""})
    return out.groupby(cols[:-1], sort=False, as_index=False)["raw"].mean()


def _bin(raw: pd.DataFrame, n_bins: int) -> pd.DataFrame:
    """Average ``raw`` over ``n_bins`` equal relative-depth bins; empty bins interpolated."""
    centres = (np.arange(n_bins) + 0.5) / n_bins
    out = []
    for key, g in raw.groupby(_KEY, sort=False):
        b = np.minimum((g["relative_depth"].to_numpy() * n_bins).astype(int), n_bins - 1)
        sums = np.bincount(b, weights=g["raw"].to_numpy(), minlength=n_bins)
        counts = np.bincount(b, minlength=n_bins)
        vals = np.full(n_bins, np.nan)
        vals[counts > 0] = sums[counts > 0] / counts[counts > 0]
        if (counts > 0).sum() >= 1 and (counts == 0).any():
            ok = counts > 0
            vals[~ok] = np.interp(centres[~ok], centres[ok], vals[ok])
        out.append(
            pd.DataFrame(
                dict(zip(_KEY, key)) | {"layer": -1, "relative_depth": centres, "raw": vals}
            )
        )
    return pd.concat(out, ignore_index=True) if out else raw


def _scale_rows(df: pd.DataFrame) -> pd.DataFrame:
    """``value = raw / max(raw)`` per (model, map, concept_set, label); all-zero rows stay 0."""
    mx = df.groupby(_KEY, sort=False)["raw"].transform("max")
    return df.assign(value=np.where(mx > 0, df["raw"] / mx.where(mx > 0, 1.0), 0.0))


def _combined(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean of the technique maps per (model, concept set, depth), representation rows first
    averaged over labels and rescaled to peak 1."""
    tech = _block_rows(cells[cells["map"].isin(TECHNIQUES)])
    if tech.empty:
        return tech
    keys = ["model", "map", "concept_set", "relative_depth"]
    per_set = tech.groupby(keys, sort=False, as_index=False).agg(
        value=("value", "mean"), layer=("layer", "first")
    )
    per_set = per_set.assign(label="", raw=per_set["value"])
    per_set = _scale_rows(per_set)
    comb = per_set.groupby(["model", "concept_set", "relative_depth"], as_index=False).agg(
        raw=("value", "mean"), layer=("layer", "first")
    )
    comb = comb.assign(map="combined", label="")
    return _scale_rows(comb)


def _summaries(cells: pd.DataFrame, binned: bool) -> pd.DataFrame:
    rows = []
    for key, g in cells.groupby(_KEY, sort=False):
        g = g.sort_values("relative_depth")
        layers = None if binned else g["layer"].to_numpy()
        fig = row_summary(g["relative_depth"].to_numpy(), g["value"].to_numpy(), layers)
        rows.append(dict(zip(_KEY, key)) | fig)
    return pd.DataFrame(rows, columns=[*_KEY, *SUMMARY_FIGURES])


def _with_reliability(summary: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Fill ``reliability`` (split-half, Spearman–Brown; technique ``stability``, metric
    ``map_split_half`` written by the causal techniques over items; for representation rows
    ``probe_acc_split_half`` / ``probe_r2_split_half`` over template halves) and ``unstable``
    (reliability < :data:`UNSTABLE_BELOW`, 1/0; NaN without a measurement) of the block-level
    and representation map rows."""
    if summary.empty or table.empty or "technique" not in table.columns:
        return summary
    st = table[(table["technique"] == "stability") & (table["metric"] == "map_split_half")]
    if "site" in st.columns:
        st = st[st["site"].astype("string").fillna("block") == "block"]
    if "objective" in st.columns:
        sal = st["label"] == "saliency"
        margin = st["objective"].astype("string").fillna("nll") == "margin"
        st = pd.concat([st[~sal], _prefer(st[sal], margin[sal])])
    rel = st.groupby(["model", "label", "concept_set"])["value"].mean()
    # representation rows (one per label): the probe profile's template split-half
    rep = table[
        (table["technique"] == "stability")
        & table["metric"].isin(["probe_acc_split_half", "probe_r2_split_half"])
    ]
    rep_rel = rep.groupby(["model", "concept_set", "label"])["value"].mean()
    out = summary.copy()
    for i, r in out.iterrows():
        if r["map"] == "representation":
            v = rep_rel.get((r["model"], r["concept_set"], r["label"]))
        elif r["label"] != "":
            continue
        else:
            v = rel.get((r["model"], r["map"], r["concept_set"]))
        if v is not None and np.isfinite(v):
            out.at[i, "reliability"] = float(v)
            out.at[i, "unstable"] = float(v < UNSTABLE_BELOW)
    return out


def _two_sample_ci(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % percentile bootstrap CI of mean(a) − mean(b), resampling a and b independently."""
    _, lo, hi = two_sample_ci(a, b, n_boot=n_boot, seed=seed)
    return lo, hi


def _contrast(
    cells: pd.DataFrame, medical: set[str], control: set[str], n_boot: int, seed: int
) -> pd.DataFrame:
    """Medical minus control per (model, map, depth) over concept-set rows (labels averaged)."""
    cols = ["model", "map", "layer", "relative_depth", "value", "ci_low", "ci_high", "n"]
    rows = []
    cells = _block_rows(cells)
    per_set = cells.groupby(["model", "map", "concept_set", "relative_depth"], as_index=False).agg(
        value=("value", "mean"), layer=("layer", "first")
    )
    for (model, mp, depth), g in per_set.groupby(["model", "map", "relative_depth"], sort=False):
        a = g.loc[g["concept_set"].isin(medical), "value"].dropna().to_numpy(float)
        b = g.loc[g["concept_set"].isin(control), "value"].dropna().to_numpy(float)
        if len(a) == 0 or len(b) == 0:
            continue
        lo, hi = _two_sample_ci(a, b, n_boot, seed)
        rows.append(
            {
                "model": model,
                "map": mp,
                "layer": int(g["layer"].iloc[0]),
                "relative_depth": float(depth),
                "value": float(a.mean() - b.mean()),
                "ci_low": lo,
                "ci_high": hi,
                "n": len(a) + len(b),
            }
        )
    return pd.DataFrame(rows, columns=cols)


def knowledge_map(
    table: pd.DataFrame,
    *,
    n_bins: int | None = None,
    medical: Iterable[str] | None = None,
    control: Iterable[str] | None = None,
    n_boot: int = 500,
    seed: int = 0,
    n_layers: dict[str, int] | None = None,
) -> KnowledgeMap:
    """Knowledge maps of every model in a tidy results table (see the module docstring).

    Args:
        table: tidy results (:data:`medmap.analysis.results.COLUMNS` plus the techniques' extras).
        n_bins: average each row over ``n_bins`` equal relative-depth bins (bin centres become
            the depth grid, ``layer = -1``). ``None``: each model's own layer grid.
        medical, control: concept-set names of the medical-minus-control contrast (default:
            the sets of the table by their metadata, :func:`set_roles`).
        n_boot, seed: bootstrap of the contrast's CI (over concept sets).
        n_layers: blocks per model (a run's manifest); default: worked out from the table.
    """
    n_layers = dict(n_layers) if n_layers else (_n_layers(table) if len(table) else {})
    raw = _raw_rows(table)
    if n_bins is not None and len(raw):
        raw = _bin(raw, int(n_bins))
    cells_cols = ["model", "map", "concept_set", "label", "layer", "relative_depth", "raw", "value"]
    if raw.empty:
        empty = pd.DataFrame(columns=cells_cols)
        return KnowledgeMap(empty, _summaries(empty, True), _contrast(empty, set(), set(), 1, 0))
    cells = _scale_rows(raw)
    comb = _combined(cells)
    cells = pd.concat([cells, comb[cells.columns]], ignore_index=True)
    order = {m: i for i, m in enumerate(MAPS)}
    rank = {s: i for i, s in enumerate(SET_ORDER)}
    cells = cells.assign(
        _o=cells["map"].map(order), _r=cells["concept_set"].map(rank).fillna(len(rank))
    ).sort_values(["model", "_o", "_r", "concept_set", "label", "relative_depth"], kind="stable")
    cells = cells.reset_index(drop=True)[cells_cols]
    cells["layer"] = cells["layer"].astype(int)
    if medical is None or control is None:
        roles = set_roles(cells["concept_set"].unique())
        medical = roles["medical"] if medical is None else medical
        control = roles["control"] if control is None else control
    med, ctl = set(medical), set(control)
    return KnowledgeMap(
        cells=cells,
        summary=_with_reliability(_summaries(cells, n_bins is not None), table),
        contrast=_contrast(cells, med, ctl, n_boot, seed),
        n_layers=n_layers,
    )


# ---------------------------------------------------------------------------------------------
# Medical vs control, from the concept sets' metadata


@functools.lru_cache(maxsize=1)
def bundled_roles() -> dict[str, bool]:
    """``{name: medical}`` of the bundled concept sets, read from their ``medical:`` field
    (the top-level keys only, without validating the whole file)."""
    import re
    from pathlib import Path

    out: dict[str, bool] = {}
    data = Path(__file__).resolve().parents[1] / "concepts" / "data"
    for f in sorted(data.glob("*.yaml")):
        text = f.read_text(encoding="utf-8")
        name = re.search(r"^name:\s*(\S+)", text, re.M)
        med = re.search(r"^medical:\s*(true|false)\b", text, re.M | re.I)
        if name and med:
            out[name.group(1)] = med.group(1).lower() == "true"
    return out


def set_roles(sets: Iterable[str] | Run) -> dict[str, list[str]]:
    """``{"medical": [...], "control": [...]}``: which concept sets are medical and which are
    controls, from ``ConceptSet.medical`` (a set with ``medical: false`` is a control, whether or
    not it names the set it controls for with ``control_for``).

    ``sets``: concept-set names / specs (a bundled name or a file path), or a
    :class:`~medmap.run.rundir.Run`, whose config lists its specs (a user's own files included).
    Names that are neither bundled nor readable files get no role.
    """
    if hasattr(sets, "config_path"):
        import json

        cfg = json.loads(sets.config_path.read_text()) if sets.config_path.exists() else {}
        specs = cfg.get("concept_sets") or list(bundled_roles())
    else:
        specs = list(sets)
    bundled = bundled_roles()
    roles: dict[str, list[str]] = {"medical": [], "control": []}
    for spec in dict.fromkeys(str(x) for x in specs):
        if spec in bundled:
            name, medical = spec, bundled[spec]
        else:
            from pathlib import Path

            if not Path(spec).exists():
                continue
            from medmap.concepts import load_concepts

            cs = load_concepts(spec)
            name, medical = cs.name, bool(cs.medical)
        roles["medical" if medical else "control"].append(name)
    return roles


def __getattr__(name: str):
    # The bundled medical / control sets, from their metadata (kept for older callers).
    if name in ("MEDICAL_SETS", "CONTROL_SETS"):
        want = name == "MEDICAL_SETS"
        order = {s: i for i, s in enumerate(SET_ORDER)}
        sets = [s for s, m in bundled_roles().items() if m == want]
        return tuple(sorted(sets, key=lambda s: (order.get(s, len(order)), s)))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# The outputs of a finished run


def build_outputs(
    run: Run | str,
    *,
    medical: Iterable[str] | None = None,
    control: Iterable[str] | None = None,
) -> tuple[KnowledgeMap, pd.DataFrame]:
    """Compute a finished run's knowledge map and findings from its ``results.parquet`` and
    write ``knowledge_map.parquet`` and ``findings.parquet`` (the report only reads them).

    ``medical`` / ``control``: concept-set names of the contrast; default :func:`set_roles` of
    the run. ``n_layers`` comes from the run's manifest. Returns ``(kmap, findings)``.
    """
    from medmap.analysis.findings import findings_table
    from medmap.errors import MedmapError
    from medmap.run.outputs import write_parquet_atomic
    from medmap.run.rundir import Run

    run = run if isinstance(run, Run) else Run(run)
    if not run.results.exists():
        raise MedmapError(
            f"{run.path} has no results.parquet", hint="pass a directory written by `medmap map`"
        )
    table = pd.read_parquet(run.results)
    mf = run.manifest()
    n_layers = {str(mf["model"]): int(mf["n_layers"])} if mf.get("n_layers") else None
    roles = set_roles(run)
    med = list(roles["medical"] if medical is None else medical)
    ctl = list(roles["control"] if control is None else control)
    kmap = knowledge_map(table, medical=med, control=ctl, n_layers=n_layers)
    findings = findings_table(table, kmap, medical=med)
    write_parquet_atomic(kmap.tidy(), run.knowledge_map)
    write_parquet_atomic(findings, run.findings)
    from medmap.analysis.specificity import matched_controls, specificity_map

    pairs = {m: c for m, c in matched_controls([*med, *ctl]).items() if m in med}
    write_parquet_atomic(specificity_map(table, pairs=pairs, controls=ctl), run.specificity_map)
    from medmap.analysis.findings import write_paper_outputs

    write_paper_outputs(table, run.path)  # paper_table.parquet, paper_intervals.parquet
    return kmap, findings
