"""The self-contained HTML report of a run (and of a comparison of runs).

One file, no network: plotly.js is inlined once in ``<head>`` and every figure is a ``<div>``
drawn by ``Plotly.newPlot`` (``include_plotlyjs=False``). Every user-supplied string (model,
concept-set, label and item names, config values) is HTML-escaped; strings inside plotly's
figure JSON are escaped as well (plotly decodes the entities when it draws text), and plotly's
JSON encoder writes ``<`` as ``\\u003c``, so no raw tag from the data reaches the page.

Sections: knowledge map, profiles, UMAP, phenomena, findings, provenance. Missing techniques or
files give a short note instead of a figure.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from medmap.analysis.maps import MAPS, TECHNIQUES, KnowledgeMap, row_names, select_rows
from medmap.errors import MedmapError
from medmap.run.rundir import Run

PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#e7969c", "#7b4173", "#3182bd",
]  # fmt: skip
TECHNIQUE_TITLES = {
    "representation": "Representation (probe score − shuffled baseline)",
    "saliency": "Weight saliency (grad × weight share of the block; margin where taken)",
    "lesion": "Layer lesion (fact-specific damage; Δ NLL without margins)",
    "patching": "Activation patching (fraction restored)",
    "emergence": "Answer emergence (logit lens: rise of forced-choice accuracy)",
    "combined": "Combined (mean of the technique maps)",
}
PROFILE_YLABEL = {
    "representation": "probe score",
    "saliency": "share of |grad × weight|",
    "lesion": "Δ NLL (nats)",
    "patching": "restored",
}
NON_LABEL_COLUMNS = {
    "concept_set", "layer", "relative_depth", "item_id", "concept", "x", "y", "method",
    "preprocess", "model", "item", "text", "n_layers",
}  # fmt: skip
MAX_CATEGORIES = 20
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:0 1.5em 3em;color:#222;line-height:1.45}
h1{margin-top:.8em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em}table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.yes{color:#176f2c;font-weight:600}.no{color:#888}.missing{color:#a33;font-style:italic}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em;max-height:30em}
.fig{margin:.5em 0 1.2em}.note{color:#555;font-size:.9em}
"""


def esc(x) -> str:
    """HTML-escape any value for the page."""
    return html.escape("" if x is None else str(x), quote=True)


def pesc(x) -> str:
    """Escape a string that plotly will draw (plotly decodes ``&lt;`` ``&gt;`` ``&amp;``)."""
    return html.escape("" if x is None else str(x), quote=False)


class Page:
    """Collects sections and figure divs; renders one self-contained HTML document."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.sections: list[tuple[str, str, list[str]]] = []
        self.n_figures = 0

    def section(self, sid: str, heading: str) -> list[str]:
        parts: list[str] = []
        self.sections.append((sid, heading, parts))
        return parts

    def figure(self, fig: go.Figure, parts: list[str], caption: str = "") -> None:
        self.n_figures += 1
        div = pio.to_html(
            fig,
            include_plotlyjs=False,
            full_html=False,
            div_id=f"fig{self.n_figures}",
            config={"displaylogo": False, "responsive": True},
            validate=False,
        )
        cap = f'<p class="note">{esc(caption)}</p>' if caption else ""
        parts.append(f'<div class="fig">{div}{cap}</div>')

    def render(self) -> str:
        from plotly.offline import get_plotlyjs

        nav = " ".join(f'<a href="#{sid}">{esc(h)}</a>' for sid, h, _ in self.sections)
        body = "\n".join(
            f'<section id="{sid}"><h2>{esc(h)}</h2>\n' + "\n".join(parts) + "</section>"
            for sid, h, parts in self.sections
        )
        return (
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(self.title)}</title><style>{CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head>"
            f'<body data-figures="{self.n_figures}"><h1>{esc(self.title)}</h1>'
            f"<nav>{nav}</nav>\n{body}\n</body></html>\n"
        )


def missing(text: str) -> str:
    return f'<p class="missing">{esc(text)}</p>'


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _layout(fig: go.Figure, title: str, *, height: int = 420, **kw) -> go.Figure:
    fig.update_layout(
        title=pesc(title),
        height=height,
        template="plotly_white",
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        **kw,
    )
    return fig


def add_line(fig, df: pd.DataFrame, name: str, color: str, *, row=None, col=None, dash=None,
             showlegend=True, legendgroup=None) -> None:  # fmt: skip
    """Line of ``value`` vs ``relative_depth`` with a shaded ``ci_low``..``ci_high`` band."""
    df = df.sort_values("relative_depth")
    x = df["relative_depth"].to_numpy(float)
    kw = {"row": row, "col": col} if row is not None else {}
    lg = pesc(legendgroup or name)  # an id, not drawn, but kept free of raw markup too
    if {"ci_low", "ci_high"} <= set(df.columns) and df["ci_low"].notna().any():
        lo, hi = df["ci_low"].to_numpy(float), df["ci_high"].to_numpy(float)
        fig.add_trace(
            go.Scatter(
                x=np.concatenate([x, x[::-1]]),
                y=np.concatenate([hi, lo[::-1]]),
                fill="toself",
                fillcolor=_rgba(color, 0.15),
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
                legendgroup=lg,
            ),
            **kw,
        )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=df["value"].to_numpy(float),
            mode="lines+markers",
            name=pesc(name),
            line={"color": color, "dash": dash},
            marker={"size": 4},
            legendgroup=lg,
            showlegend=showlegend,
            hovertemplate=f"{pesc(name)}<br>depth %{{x:.2f}}: %{{y:.3g}}<extra></extra>",
        ),
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# Sections


def heatmap(m: pd.DataFrame, title: str, *, zmin=0.0, zmax=1.0, colorscale="Viridis") -> go.Figure:
    fig = go.Figure(
        go.Heatmap(
            z=m.to_numpy(float),
            x=[float(c) for c in m.columns],
            y=[pesc(r) for r in m.index],
            zmin=zmin,
            zmax=zmax,
            colorscale=colorscale,
            colorbar={"title": {"text": "effect"}},
            hovertemplate="%{y}<br>depth %{x:.2f}: %{z:.2f}<extra></extra>",
        )
    )
    _layout(fig, title, height=max(260, 90 + 28 * len(m)))
    fig.update_xaxes(title="relative depth (layer / n_layers)", range=[-0.03, 1.03])
    fig.update_yaxes(autorange="reversed", automargin=True)
    return fig


def map_section(page: Page, kmap: KnowledgeMap, model: str) -> None:
    parts = page.section("knowledge-map", "Knowledge map")
    parts.append(
        '<p class="note">Each row is scaled to a peak of 1 (see docs/knowledge-map.md). Depth is '
        "layer / n_layers: 0 = embedding output, 1 = after the last block.</p>"
    )
    avail = kmap.available(model)
    if not avail:
        parts.append(missing("No technique rows to build a knowledge map from."))
        return
    for name in MAPS:
        if name not in avail:
            parts.append(missing(f"{TECHNIQUE_TITLES[name]}: not in this run."))
            continue
        page.figure(heatmap(kmap.matrix(name, model), TECHNIQUE_TITLES[name]), parts)
    con = kmap.contrast[kmap.contrast["model"] == model]
    if len(con):
        fig = go.Figure()
        for i, (mp, g) in enumerate(con.groupby("map", sort=False)):
            add_line(fig, g, mp, _color(i))
        fig.add_hline(y=0, line={"color": "#888", "dash": "dot"})
        _layout(fig, "Medical minus control (normalised effect, 95% CI over concept sets)")
        fig.update_xaxes(title="relative depth")
        page.figure(fig, parts)
    else:
        parts.append(missing("Medical minus control: needs medical and control concept sets."))
    s = kmap.summary[kmap.summary["model"] == model]
    if len(s):
        parts.append("<h3>Where the effect sits (per map row)</h3>" + summary_table(s))


def specificity_section(page: Page, spec: pd.DataFrame, model: str) -> None:
    """Per technique: medical minus matched control, normalised, blank where the CI holds 0."""
    parts = page.section("specificity", "Specificity map: medical minus its control")
    parts.append(
        '<p class="note">Per technique and layer, the medical set\'s effect minus its matched '
        "control's (years for ages, occupations for symptoms, countries for diseases, animals for "
        "drugs; the other medical sets against the mean of the controls), on the technique's own "
        "scale: probe gain over the embedding layer, margin saliency share, fact-specific lesion "
        "damage, patching restoration. Cells whose 95% CI contains 0 are blank; each row is "
        "divided by its largest significant |difference| (1 = most medical-specific, −1 = most "
        "control-specific). Combined: mean of the positive specific effects. See "
        "docs/knowledge-map.md.</p>"
    )
    s = spec[spec["model"].astype(str) == model] if len(spec) else spec
    if s.empty:
        parts.append(missing("Needs medical and control concept sets with CIs."))
        return
    from medmap.analysis.specificity import specificity_matrix

    for name in TECHNIQUE_TITLES:
        m = specificity_matrix(s, name, model)
        if m.empty:
            continue
        lo = 0.0 if name == "combined" else -1.0
        page.figure(
            heatmap(m, f"{TECHNIQUE_TITLES[name]}: specific effect", zmin=lo, zmax=1.0,
                    colorscale="Viridis" if name == "combined" else "RdBu_r"),
            parts,
        )  # fmt: skip


def summary_table(s: pd.DataFrame) -> str:
    head = (
        "<tr><th>map</th><th>concept set</th><th>label</th><th>peak layer</th><th>peak depth</th>"
        "<th>50% of effect</th><th>80% of effect</th><th>first-half fraction</th>"
        "<th>split-half reliability</th></tr>"
    )
    body = []
    for r in s.to_dict("records"):
        pl = "" if not np.isfinite(r["peak_layer"]) or r["peak_layer"] < 0 else int(r["peak_layer"])
        body.append(
            f"<tr><td>{esc(r['map'])}</td><td>{esc(r['concept_set'])}</td><td>{esc(r['label'])}</td>"
            f"<td class='num'>{pl}</td><td class='num'>{_f(r['peak_depth'])}</td>"
            f"<td class='num'>{_f(r['depth50_low'])}–{_f(r['depth50_high'])}</td>"
            f"<td class='num'>{_f(r['depth80_low'])}–{_f(r['depth80_high'])}</td>"
            f"<td class='num'>{_f(r['first_half_fraction'])}</td>"
            f"<td class='num'>{_reliability(r)}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _reliability(r: dict) -> str:
    rel = r.get("reliability", np.nan)
    if rel is None or not np.isfinite(float(rel)):
        return "–"
    flag = " <b>unstable</b>" if float(r.get("unstable") or 0) >= 1 else ""
    return f"{float(rel):.2f}{flag}"


def _f(x, nd: int = 2) -> str:
    try:
        return f"{float(x):.{nd}f}" if np.isfinite(float(x)) else "–"
    except (TypeError, ValueError):
        return esc(x)


def profiles_section(page: Page, table: pd.DataFrame) -> None:
    parts = page.section("profiles", "Profiles per concept set")
    for name in TECHNIQUES:
        rows = select_rows(table, name)
        if rows.empty:
            parts.append(missing(f"{TECHNIQUE_TITLES[name]}: not in this run."))
            continue
        fig = go.Figure()
        names = row_names(rows)
        for i, (nm, g) in enumerate(rows.assign(_n=names).groupby("_n", sort=False)):
            add_line(fig, g, nm, _color(i))
            if name == "representation" and g["baseline"].notna().any():
                b = g.sort_values("relative_depth")
                fig.add_trace(
                    go.Scatter(
                        x=b["relative_depth"],
                        y=b["baseline"],
                        mode="lines",
                        line={"color": _color(i), "dash": "dot", "width": 1},
                        name=pesc(f"{nm} (shuffled)"),
                        legendgroup=pesc(nm),
                        showlegend=False,
                        hoverinfo="skip",
                    )
                )
        _layout(fig, TECHNIQUE_TITLES[name].split(" (")[0] + " by depth (95% CI)")
        fig.update_xaxes(title="relative depth")
        fig.update_yaxes(title=PROFILE_YLABEL[name])
        cap = "dotted: shuffled-label baseline" if name == "representation" else ""
        page.figure(fig, parts, cap)


def _label_columns(coords: pd.DataFrame) -> list[str]:
    cols = []
    for c in coords.columns:
        if c in NON_LABEL_COLUMNS or c.startswith("_"):
            continue
        if coords[c].notna().any():
            cols.append(c)
    return cols


def umap_figure(c: pd.DataFrame, cset: str) -> go.Figure:
    """Scatter of one concept set with a layer slider (restyle steps) and a label dropdown."""
    c = c.sort_values(["layer", "item_id"])
    layers = sorted(c["layer"].unique())
    first = c[c["layer"] == layers[0]].reset_index(drop=True)
    items = list(first["item_id"])
    xy = {
        layer: g.set_index("item_id").reindex(items)[["x", "y"]].to_numpy(float).round(4)
        for layer, g in c.groupby("layer")
    }
    labels = _label_columns(first)
    concept = first["concept"] if "concept" in first.columns else first["item_id"]
    hover = []
    for i in range(len(first)):
        extra = "".join(f"<br>{pesc(lab)}: {pesc(first.at[i, lab])}" for lab in labels)
        hover.append(f"<b>{pesc(concept.iloc[i])}</b>{extra}")
    hover = np.array(hover, dtype=object)
    fig = go.Figure()
    groups: list[list[int]] = []  # trace indices per label
    members: list[np.ndarray] = []  # item indices per trace
    for li, lab in enumerate(labels or [None]):
        idx: list[int] = []
        col = first[lab] if lab is not None else pd.Series([""] * len(first))
        numeric = (
            lab is not None
            and pd.api.types.is_numeric_dtype(col)
            and col.nunique() > MAX_CATEGORIES // 2
        )
        visible = li == 0
        if numeric:
            mem = np.flatnonzero(col.notna().to_numpy()) if col.notna().any() else np.arange(0)
            fig.add_trace(
                go.Scatter(
                    x=xy[layers[0]][mem, 0],
                    y=xy[layers[0]][mem, 1],
                    mode="markers",
                    marker={
                        "color": col.to_numpy(float)[mem],
                        "colorscale": "Viridis",
                        "showscale": True,
                        "colorbar": {"title": {"text": pesc(lab)}},
                        "size": 8,
                    },
                    hovertext=hover[mem],
                    hovertemplate="%{hovertext}<extra></extra>",
                    name=pesc(lab),
                    visible=visible,
                    showlegend=False,
                )
            )
            idx.append(len(fig.data) - 1)
            members.append(mem)
        else:
            vals = col.astype("string").fillna("(missing)").astype(str)
            top = list(vals.value_counts().index[:MAX_CATEGORIES])
            vals = vals.where(vals.isin(top), "(other)")
            for k, cat in enumerate(dict.fromkeys(sorted(vals))):
                mem = np.flatnonzero((vals == cat).to_numpy())
                fig.add_trace(
                    go.Scatter(
                        x=xy[layers[0]][mem, 0],
                        y=xy[layers[0]][mem, 1],
                        mode="markers",
                        marker={"color": _color(k), "size": 8},
                        hovertext=hover[mem],
                        hovertemplate="%{hovertext}<extra></extra>",
                        name=pesc(cat) if lab is not None else pesc(cset),
                        legendgroup=f"label{li}",
                        legendgrouptitle={"text": pesc(lab)} if lab else None,
                        visible=visible,
                    )
                )
                idx.append(len(fig.data) - 1)
                members.append(mem)
        groups.append(idx)
    n_traces = len(fig.data)
    steps = []
    for layer in layers:
        steps.append(
            {
                "method": "restyle",
                "label": str(int(layer)),
                "args": [
                    {
                        "x": [xy[layer][m, 0].tolist() for m in members],
                        "y": [xy[layer][m, 1].tolist() for m in members],
                    },
                    list(range(n_traces)),
                ],
            }
        )
    allxy = np.concatenate(list(xy.values()))
    lo, hi = np.nanmin(allxy, axis=0), np.nanmax(allxy, axis=0)
    pad = (hi - lo) * 0.05 + 1e-9
    menus = []
    if len(labels) > 1:
        buttons = []
        for li, lab in enumerate(labels):
            vis = [False] * n_traces
            for t in groups[li]:
                vis[t] = True
            buttons.append({"method": "restyle", "label": pesc(lab), "args": [{"visible": vis}]})
        menus.append(
            {
                "buttons": buttons,
                "direction": "down",
                "x": 0.0,
                "y": 1.13,
                "xanchor": "left",
                "yanchor": "top",
                "showactive": True,
            }  # fmt: skip
        )
    _layout(
        fig,
        f"UMAP of {cset}" + (" — colour by label (menu)" if len(labels) > 1 else ""),
        height=560,
        sliders=[
            {
                "active": 0,
                "steps": steps,
                "currentvalue": {"prefix": "layer "},
                "pad": {"t": 40},
                "name": "layer",
            }
        ],
        updatemenus=menus,
        legend={"itemsizing": "constant"},
    )
    fig.update_layout(margin={"t": 90})
    fig.update_xaxes(range=[lo[0] - pad[0], hi[0] + pad[0]], title="UMAP 1")
    fig.update_yaxes(range=[lo[1] - pad[1], hi[1] + pad[1]], title="UMAP 2")
    return fig


def umap_section(page: Page, coords: pd.DataFrame | None) -> None:
    parts = page.section("umap", "UMAP per concept set")
    if coords is None or coords.empty:
        parts.append(missing("No UMAP coordinates in this run (umap_coords.parquet)."))
        return
    parts.append(
        '<p class="note">Drag the slider to move through the layers (Procrustes-aligned, so '
        "movement is real). Hover a point to see the item.</p>"
    )
    for cset, c in coords.groupby("concept_set", sort=False):
        page.figure(umap_figure(c, str(cset)), parts)


def _phen(table: pd.DataFrame, metric: str, label: str | None = None, technique="phenomenon"):
    t = table[(table["technique"] == technique) & (table["metric"] == metric)]
    t = t[t["layer"] >= 0]
    if label is not None:
        t = t[t["label"] == label]
    return t


def phenomena_section(page: Page, table: pd.DataFrame) -> None:
    parts = page.section("phenomena", "Phenomena")
    # age jump profile
    jump = _phen(table, "age_jump_ratio")
    if len(jump):
        fig = go.Figure()
        for i, (cs, g) in enumerate(jump.groupby("concept_set", sort=False)):
            add_line(fig, g, f"{cs}: controlled", _color(i))
        un = _phen(table, "age_jump_ratio_uncontrolled")
        for i, (cs, g) in enumerate(un.groupby("concept_set", sort=False)):
            add_line(fig, g, f"{cs}: uncontrolled", _color(i), dash="dot")
        fig.add_hline(y=2.0, line={"color": "#888", "dash": "dash"})
        _layout(fig, "Age discontinuity: largest step / median step between consecutive ages")
        fig.update_xaxes(title="relative depth")
        fig.update_yaxes(title="jump ratio")
        page.figure(fig, parts, "dashed line: the findings threshold (2)")
    else:
        parts.append(missing("Age jump profile: no age_jump_ratio rows."))
    # progression
    circ = _phen(table, "progression_circularity")
    if len(circ):
        fig = go.Figure()
        mean = circ[circ["label"] == "mean"]
        add_line(fig, mean if len(mean) else circ, "circularity (mean over series)", _color(0))
        mono = _phen(table, "progression_monotonicity", "mean")
        if len(mono):
            add_line(fig, mono, "monotonicity (mean)", _color(1), dash="dash")
        for i, (lab, g) in enumerate(circ[circ["label"] != "mean"].groupby("label", sort=False)):
            fig.add_trace(
                go.Scatter(
                    x=g["relative_depth"],
                    y=g["value"],
                    mode="lines",
                    line={"color": _color(i + 2), "width": 1},
                    opacity=0.5,
                    name=pesc(f"circularity: {lab}"),
                    visible="legendonly",
                )
            )
        _layout(fig, "Disease progression: circularity and monotonicity of the stage path")
        fig.update_xaxes(title="relative depth")
        page.figure(fig, parts)
    else:
        parts.append(missing("Progression circularity: no progression rows."))
    # specialty vs mechanism
    spec = _phen(table, "specialty_minus_mechanism_purity_excess")
    name = "k-NN purity excess"
    if spec.empty:
        spec, name = _phen(table, "specialty_minus_mechanism_purity"), "k-NN purity"
    if len(spec):
        fig = go.Figure()
        for i, (cs, g) in enumerate(spec.groupby("concept_set", sort=False)):
            add_line(fig, g, f"{cs}: specialty − mechanism ({name})", _color(i))
        sil = _phen(table, "specialty_minus_mechanism_silhouette")
        for i, (cs, g) in enumerate(sil.groupby("concept_set", sort=False)):
            add_line(fig, g, f"{cs}: silhouette difference", _color(i + 3), dash="dot")
        fig.add_hline(y=0, line={"color": "#888", "dash": "dot"})
        _layout(fig, "Drugs: clustering by specialty minus by mechanism (> 0: specialty)")
        fig.update_xaxes(title="relative depth")
        page.figure(fig, parts)
    else:
        parts.append(missing("Specialty vs mechanism: no specialty_minus_mechanism rows."))
    # geometry
    er = _phen(table, "effective_rank", technique="geometry")
    an = _phen(table, "anisotropy", technique="geometry")
    if len(er) or len(an):
        fig = make_subplots(rows=1, cols=2, subplot_titles=("effective rank", "anisotropy"))
        for k, (df, col) in enumerate(((er, 1), (an, 2))):
            for i, (cs, g) in enumerate(df.groupby("concept_set", sort=False)):
                add_line(fig, g, str(cs), _color(i), row=1, col=col, showlegend=k == 0,
                         legendgroup=str(cs))  # fmt: skip
        _layout(fig, "Geometry of the residual stream (collapse and recovery)", height=400)
        fig.update_xaxes(title="relative depth")
        page.figure(fig, parts)
    else:
        parts.append(missing("Geometry profiles: no effective_rank / anisotropy rows."))


def findings_html(f: pd.DataFrame, *, with_model: bool = False) -> str:
    if f.empty:
        return missing("No findings.")
    head = "<tr>" + ("<th>model</th>" if with_model else "")
    head += (
        "<th>finding</th><th>value</th><th>95% CI</th><th>where</th><th>present</th>"
        "<th>rule</th><th>detail</th></tr>"
    )
    body = []
    for r in f.to_dict("records"):
        yes = '<span class="yes">yes</span>' if r["present"] else '<span class="no">no</span>'
        body.append(
            "<tr>"
            + (f"<td>{esc(r['model'])}</td>" if with_model else "")
            + f"<td>{esc(r['finding'])}</td><td class='num'>{_f(r['value'], 3)}</td>"
            f"<td class='num'>[{_f(r['ci_low'], 3)}, {_f(r['ci_high'], 3)}]</td>"
            f"<td>{esc(r['where'])}</td><td>{yes}</td><td>{esc(r['rule'])}</td>"
            f"<td>{esc(r['detail'])}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def provenance_html(manifest: dict) -> str:
    if not manifest:
        return missing("No manifest.json in this run.")
    keys = ["model", "n_layers", "d_model", "weights_hash", "weights_source", "started",
            "finished", "rows"]  # fmt: skip
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(manifest[k])}</td></tr>" for k in keys if k in manifest
    )
    out = [f"<table>{rows}</table>"]
    stages = manifest.get("stages") or {}
    if stages:
        srows = "".join(
            f"<tr><td>{esc(k)}</td><td class='num'>{_f(v, 1)}</td></tr>" for k, v in stages.items()
        )
        out.append(
            f"<h3>Stage durations</h3><table><tr><th>stage</th><th>seconds</th></tr>{srows}</table>"
        )
    for key, title in (("versions", "Versions"), ("host", "Host"), ("seeds", "Seeds")):
        d = manifest.get(key)
        if d:
            out.append(f"<h3>{title}</h3><pre>{esc(json.dumps(d, indent=1, default=str))}</pre>")
    if manifest.get("config") is not None:
        cfg = json.dumps(manifest["config"], indent=1, default=str)
        out.append(f"<h3>Config</h3><pre>{esc(cfg)}</pre>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Entry points


def load_run(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, dict]:
    """``(results, umap coordinates or None, manifest)`` of a run directory."""
    run = Run(run_dir)
    if not run.results.exists():
        raise MedmapError(
            f"{run_dir} has no results.parquet", hint="pass a directory written by `medmap map`"
        )
    table = pd.read_parquet(run.results)
    coords = pd.read_parquet(run.umap_coords) if run.umap_coords.exists() else None
    return table, coords, run.manifest()


def knows_html(table: pd.DataFrame) -> str:
    """The knows stage per concept set: forced-choice fraction known (95 % CI) beside its chance
    level and the moved-answer control, the number of known targets, and whether the causal
    techniques mapped the set or it had "too few known facts". Empty when no knows rows."""
    t = table[table["technique"].astype(str) == "knows"] if len(table) else table
    if t.empty:
        return ""
    head = (
        "<tr><th>concept set</th><th>targets</th><th>known (95% CI)</th><th>chance</th>"
        "<th>moved-answer control</th><th>known targets</th><th>causal techniques</th></tr>"
    )
    body = []
    for cset, g in t.groupby("concept_set", sort=False):
        m = {r.metric: r for r in g.itertuples(index=False)}
        if "known_fraction" not in m or "n_known" not in m:
            continue
        kf, mv, nk = m["known_fraction"], m.get("moved_known_fraction"), m["n_known"]
        few = "too_few_known" in m and float(m["too_few_known"].value) >= 1
        chance_level = "known_above_chance" in m and float(m["known_above_chance"].value) < 1
        status = (
            f"<b>too few known facts</b> (&lt; {int(m['too_few_known'].baseline)}): not mapped"
            if few
            else "mapped on the known targets"
            + (
                "; <b>known at chance level</b> (CI not above chance and the moved-answer "
                "control): the kept targets may be lucky guesses"
                if chance_level
                else ""
            )
        )
        body.append(
            f"<tr><td>{esc(cset)}</td><td class='num'>{int(kf.n)}</td>"
            f"<td class='num'>{_f(kf.value)} ({_f(kf.ci_low)}–{_f(kf.ci_high)})</td>"
            f"<td class='num'>{_f(kf.baseline)}</td>"
            f"<td class='num'>{_f(mv.value) if mv is not None else '–'}</td>"
            f"<td class='num'>{int(nk.value)}</td><td>{status}</td></tr>"
        )
    note = (
        "<p>Forced choice: a target is known when its best accepted answer's whole-answer "
        "log-probability beats every distractor's. The moved-answer control scores each prompt "
        "with another item's answers taken as right; a known fraction near it measures nothing. "
        "Saliency, lesioning and patching use the known targets only (<code>known_only</code>).</p>"
    )
    return note + f"<table>{head}{''.join(body)}</table>"


def emergence_html(table: pd.DataFrame) -> str:
    """Answer emergence per concept set: the median depth from which the lens's forced choice
    stays right (95 % CI, n = targets right at the last layer), through the logit lens and the
    tuned lens side by side, and each lens's accuracy at mid-depth. Empty without lens rows."""
    from medmap.analysis.maps import lens_rows

    t = table[table["technique"].astype(str) == "logit_lens"] if len(table) else table
    if t.empty:
        return ""
    lenses = [x for x in ("logit", "tuned") if len(lens_rows(t, "emergence_depth", x))]
    head = "<tr><th>concept set</th>" + "".join(
        f"<th>{x} lens: emergence depth (95% CI)</th><th>{x} lens: accuracy at depth ≈ 0.5</th>"
        for x in lenses
    ) + "<th>n</th></tr>"  # fmt: skip
    body = []
    for cset in dict.fromkeys(t["concept_set"].astype(str)):
        cells, n = [], 0
        g = t[t["concept_set"].astype(str) == cset]
        for x in lenses:
            em, acc = lens_rows(g, "emergence_depth", x), lens_rows(g, "lens_accuracy", x)
            if em.empty:
                cells.append("<td>–</td><td>–</td>")
                continue
            r = em.iloc[0]
            n = int(r["n"])
            mid = acc.iloc[(acc["relative_depth"] - 0.5).abs().argsort()[:1]]
            a = (
                f"{_f(mid['value'].iloc[0])} (chance {_f(mid['baseline'].iloc[0])})"
                if len(mid)
                else "–"
            )
            cells.append(
                f"<td class='num'>{_f(r['value'])} ({_f(r['ci_low'])}–{_f(r['ci_high'])})</td>"
                f"<td class='num'>{a}</td>"
            )
        body.append(f"<tr><td>{esc(cset)}</td>{''.join(cells)}<td class='num'>{n}</td></tr>")
    note = (
        "<p>Each layer's residual stream decoded through the model's final norm and unembedding "
        "(logit lens) or first mapped to the last block's output by an affine translator fitted on "
        "the neutral text (tuned lens, linear shortcut); forced choice of whole answers. "
        "Emergence depth: over the targets the model gets right, the median first depth from "
        "which the choice stays right. The answer-emergence map reads the logit lens.</p>"
    )
    return note + f"<table>{head}{''.join(body)}</table>"


def paper_html(t1: pd.DataFrame | None, iv: pd.DataFrame | None, model: str) -> str:
    """The paper's Table 1 (best layer and score per concept, with the null where there is one)
    and its interval map (per set and technique: the representation's fastest 3-layer rise, the
    causal techniques' runs above the 75th percentile), as stored by the run."""
    parts = []
    t1 = t1[t1["model"].astype(str) == model] if t1 is not None and len(t1) else None
    if t1 is not None and len(t1):
        head = (
            "<tr><th>concept</th><th>metric</th><th>best layer</th><th>depth</th>"
            "<th>score (95% CI)</th><th>null (95% range)</th></tr>"
        )
        body = [
            f"<tr><td>{esc(r.concept)}</td><td>{esc(r.metric)}</td>"
            f"<td class='num'>{int(r.best_layer)}</td><td class='num'>{_f(r.relative_depth)}</td>"
            f"<td class='num'>{_f(r.value)} ({_f(r.ci_low)}–{_f(r.ci_high)})</td>"
            f"<td class='num'>{_f(r.null_value)} ({_f(r.null_ci_low)}–{_f(r.null_ci_high)})</td></tr>"
            for r in t1.itertuples(index=False)
        ]
        parts.append(
            "<h3>Table 1, as the paper defines it</h3>"
            "<p class='note'>The best layer is the layer of the highest score: a maximum over "
            "layers is biased upwards; read it against its null at that layer.</p>"
            f"<table>{head}{''.join(body)}</table>"
        )
    iv = iv[iv["model"].astype(str) == model] if iv is not None and len(iv) else None
    if iv is not None and len(iv):
        head = (
            "<tr><th>concept set</th><th>technique</th><th>layers</th><th>depth</th>"
            "<th>score</th><th>rule</th></tr>"
        )
        body = [
            f"<tr><td>{esc(r.concept_set)}</td><td>{esc(r.technique)}</td>"
            f"<td class='num'>{int(r.layer_start)}–{int(r.layer_end)}</td>"
            f"<td class='num'>{_f(r.depth_start)}–{_f(r.depth_end)}</td>"
            f"<td class='num'>{_f(r.score)}</td><td>{esc(r.rule)}</td></tr>"
            for r in iv.itertuples(index=False)
        ]
        parts.append(
            "<h3>The paper's interval map</h3><p class='note'>Gaussian smoothing σ = 1; no null "
            "or control enters these intervals (the paper's method): compare them with the "
            "specificity map above.</p>" + f"<table>{head}{''.join(body)}</table>"
        )
    return "".join(parts)


def _experiment_sections(page: Page, run_dir: Path) -> None:
    """Calibration (planted facts) and map-guided editing sections, when the run directory holds
    their results (``medmap calibrate|edit-test --out`` into it); nothing otherwise."""
    from medmap.experiments.report import calibration_section, edit_test_section

    for sid, heading, render in (
        ("calibration", "Calibration: planted facts", calibration_section),
        ("edit-test", "Map-guided editing", edit_test_section),
    ):
        fragment = render(run_dir)
        if fragment:
            page.section(sid, heading).append(fragment)


def build_report(
    run_dir: str | Path,
    *,
    medical: list[str] | None = None,
    control: list[str] | None = None,
    figures: bool = True,
) -> Path:
    """Write ``RUN_DIR/report.html`` (self-contained) and ``RUN_DIR/figures/`` (PNG + SVG).

    The report only reads the run's files: ``results.parquet``, ``umap_coords.parquet``,
    ``manifest.json``, ``knowledge_map.parquet`` and ``findings.parquet``. The last two are
    written at the end of a run (:func:`medmap.analysis.maps.build_outputs`); they are
    (re)computed first when missing, or when ``medical`` / ``control`` (the concept sets of the
    contrast) are given. Returns the path of ``report.html``.
    """
    from medmap.analysis.maps import build_outputs
    from medmap.run.outputs import write_text_atomic

    run = Run(run_dir)
    table, coords, manifest = load_run(run.path)
    stale = not (run.knowledge_map.exists() and run.findings.exists())
    if stale or medical is not None or control is not None:
        build_outputs(run, medical=medical, control=control)
    kmap = KnowledgeMap.from_tidy(pd.read_parquet(run.knowledge_map))
    findings = pd.read_parquet(run.findings)
    model = str(manifest.get("model") or (table["model"].iloc[0] if len(table) else "model"))
    if len(table) and model not in set(table["model"].astype(str)):
        model = str(table["model"].iloc[0])
    page = Page(f"medmap report: {model}")
    map_section(page, kmap, model)
    if run.specificity_map.exists():
        specificity_section(page, pd.read_parquet(run.specificity_map), model)
    known = knows_html(table[table["model"].astype(str) == model] if len(table) else table)
    if known:
        page.section("known", "Known facts").append(known)
    emerge = emergence_html(table[table["model"].astype(str) == model] if len(table) else table)
    if emerge:
        page.section("emergence", "Answer emergence (logit and tuned lens)").append(emerge)
    profiles_section(page, table[table["model"].astype(str) == model] if len(table) else table)
    umap_section(page, coords)
    phenomena_section(page, table)
    page.section("findings", "Findings").append(findings_html(findings[findings["model"] == model]))
    t1p, ivp = run.paper_table, run.paper_intervals
    paper = paper_html(
        pd.read_parquet(t1p) if t1p.exists() else None,
        pd.read_parquet(ivp) if ivp.exists() else None,
        model,
    )
    if paper:
        page.section("paper", "The paper's table and interval map").append(paper)
    _experiment_sections(page, run.path)
    page.section("provenance", "Provenance").append(provenance_html(manifest))
    if figures:
        from medmap.report.figures import run_figures

        spec = pd.read_parquet(run.specificity_map) if run.specificity_map.exists() else None
        run_figures(table, kmap, findings, run.figures, model=model, spec=spec)
    return write_text_atomic(run.report, page.render())


def compare_html(runs: list[dict], kmap: KnowledgeMap, findings: pd.DataFrame, cka) -> str:
    """The comparison page: maps side by side, CKA between models, all findings."""
    models = [r["model"] for r in runs]
    page = Page("medmap comparison: " + ", ".join(models))
    parts = page.section("maps", "Knowledge maps side by side")
    parts.append('<p class="note">Models aligned on relative depth (layer / n_layers).</p>')
    for name in MAPS:
        mats = [(m, kmap.matrix(name, m)) for m in models]
        mats = [(m, x) for m, x in mats if not x.empty]
        if not mats:
            continue
        fig = make_subplots(
            rows=1, cols=len(mats), subplot_titles=[pesc(m) for m, _ in mats], shared_yaxes=True
        )
        for k, (_, x) in enumerate(mats):
            fig.add_trace(
                go.Heatmap(
                    z=x.to_numpy(float),
                    x=[float(c) for c in x.columns],
                    y=[pesc(r) for r in x.index],
                    zmin=0,
                    zmax=1,
                    colorscale="Viridis",
                    showscale=k == 0,
                    hovertemplate="%{y}<br>depth %{x:.2f}: %{z:.2f}<extra></extra>",
                ),
                row=1,
                col=k + 1,
            )
        n_rows = max(len(x) for _, x in mats)
        _layout(fig, TECHNIQUE_TITLES[name], height=max(280, 110 + 28 * n_rows))
        fig.update_xaxes(title="relative depth", range=[-0.03, 1.03])
        fig.update_yaxes(autorange="reversed", automargin=True)
        page.figure(fig, parts)
    if len(parts) == 1:
        parts.append(missing("No technique rows in these runs."))
    parts = page.section("cka", "Layer similarity between models (linear CKA)")
    if cka is None or len(cka) == 0:
        parts.append(missing("No shared activation stores between these runs."))
    else:
        parts.append(
            '<p class="note">Linear CKA (debiased, unbiased HSIC estimator, unless the metric '
            "is linear_cka) on the shared items of each concept set, averaged over concept sets "
            "(per-set values in compare.parquet; ≈ 0 means unrelated, 1 identical up to "
            "rotation and scale).</p>"
        )
        for (ma, mb), g in cka.groupby(["model", "model_b"], sort=False):
            m = g.pivot_table(index="layer", columns="layer_b", values="value", aggfunc="mean")
            fig = go.Figure(
                go.Heatmap(
                    z=m.to_numpy(float),
                    x=[int(c) for c in m.columns],
                    y=[int(i) for i in m.index],
                    zmin=0,
                    zmax=1,
                    colorscale="Viridis",
                    hovertemplate=f"{pesc(ma)} layer %{{y}}<br>{pesc(mb)} layer %{{x}}"
                    "<br>CKA %{z:.2f}<extra></extra>",
                )
            )
            _layout(fig, f"{ma} × {mb} ({g['concept_set'].nunique()} concept sets)", height=480)
            fig.update_xaxes(title=pesc(f"{mb} layer"))
            fig.update_yaxes(title=pesc(f"{ma} layer"))
            page.figure(fig, parts)
    page.section("findings", "Findings").append(findings_html(findings, with_model=True))
    prov = page.section("provenance", "Provenance")
    for r in runs:
        prov.append(
            f"<h3>{esc(r['model'])} — {esc(r['dir'])}</h3>" + provenance_html(r["manifest"])
        )
    return page.render()
