"""Static figures for papers (matplotlib, PNG at 300 dpi + SVG), legible at column width.

Every figure is 3.5 in wide with fonts of at least 7 pt. Written by :func:`run_figures`:

- ``knowledge_map.{png,svg}``: combined map heatmap; ``knowledge_map_<technique>.{png,svg}``
- ``profiles_<technique>.{png,svg}``: value vs relative depth per concept set, 95 % CI bands
- ``findings.{png,svg}``: four phenomenon panels (age jump, progression circularity,
  specialty − mechanism, relative effective rank) with the findings thresholds

and by :func:`compare_figures`: ``compare_map.{png,svg}`` and ``cka_<a>__<b>.{png,svg}``.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from medmap.analysis.maps import TECHNIQUES, KnowledgeMap, row_names, select_rows  # noqa: E402

WIDTH = 3.5  # inches (one column)
RC = {
    "font.size": 7,
    "axes.titlesize": 7.5,
    "axes.labelsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.0,
    "svg.fonttype": "none",
}
COLORS = plt.get_cmap("tab10").colors
YLABEL = {
    "representation": "probe score",
    "saliency": "block share",
    "lesion": "fact-specific damage or Δ NLL (nats)",
    "patching": "restored",
}


def safe_name(s: str) -> str:
    """A file-name-safe version of ``s``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_") or "x"


def save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        p = out_dir / f"{stem}.{ext}"
        fig.savefig(p, dpi=300)
        paths.append(p)
    plt.close(fig)
    return paths


def _heat(ax, m: pd.DataFrame, title: str):
    depths = np.array([float(c) for c in m.columns])
    edges = _edges(depths)
    im = ax.pcolormesh(edges, np.arange(len(m) + 1), m.to_numpy(float), vmin=0, vmax=1,
                       cmap="viridis", shading="flat")  # fmt: skip
    ax.set_yticks(np.arange(len(m)) + 0.5, [str(r) for r in m.index])
    ax.invert_yaxis()
    ax.set_xlim(0, 1) if depths.min() >= 0 else None
    ax.set_xlabel("relative depth")
    ax.set_title(title)
    return im


def _edges(d: np.ndarray) -> np.ndarray:
    if len(d) == 1:
        return np.array([d[0] - 0.05, d[0] + 0.05])
    mid = (d[1:] + d[:-1]) / 2
    return np.concatenate([[d[0] - (mid[0] - d[0])], mid, [d[-1] + (d[-1] - mid[-1])]])


def map_figure(kmap: KnowledgeMap, model: str, map_name: str, out_dir: Path) -> list[Path]:
    m = kmap.matrix(map_name, model)
    if m.empty:
        return []
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(WIDTH, 0.9 + 0.17 * len(m)), layout="constrained")
        im = _heat(ax, m, f"{model}: {map_name} map")
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, label="normalised effect")
        stem = "knowledge_map" if map_name == "combined" else f"knowledge_map_{map_name}"
        return save(fig, out_dir, stem)


def specificity_figure(spec: pd.DataFrame, model: str, out_dir: Path) -> list[Path]:
    """One panel per map of the specificity map (medical − matched control, normalised to
    [−1, 1], blank where the CI contains 0): ``specificity_map.png``."""
    from medmap.analysis.specificity import specificity_matrix

    names = ("representation", "saliency", "lesion", "patching", "emergence", "combined")
    mats = [(m, specificity_matrix(spec, m, model)) for m in names]
    mats = [(m, x) for m, x in mats if not x.empty]
    if not mats:
        return []
    with plt.rc_context(RC):
        h = sum(0.55 + 0.17 * len(x) for _, x in mats)
        fig, axes = plt.subplots(len(mats), 1, figsize=(WIDTH, 0.6 + h), layout="constrained",
                                 squeeze=False)  # fmt: skip
        for ax, (m, mat) in zip(axes[:, 0], mats):
            depths = np.array([float(c) for c in mat.columns])
            cmap = plt.get_cmap("viridis" if m == "combined" else "RdBu_r").copy()
            cmap.set_bad("#eeeeee")
            vals = np.ma.masked_invalid(mat.to_numpy(float))
            im = ax.pcolormesh(_edges(depths), np.arange(len(mat) + 1), vals, cmap=cmap,
                               vmin=0 if m == "combined" else -1, vmax=1, shading="flat")  # fmt: skip
            ax.set_yticks(np.arange(len(mat)) + 0.5, [str(r) for r in mat.index])
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            ax.set_title(f"{m}: medical − control (grey: CI contains 0)", fontsize="small")
            fig.colorbar(im, ax=ax, fraction=0.04, pad=0.01)
        axes[-1, 0].set_xlabel("relative depth")
        return save(fig, out_dir, "specificity_map")


def _band(ax, g: pd.DataFrame, label: str, color, ls="-") -> None:
    g = g.sort_values("relative_depth")
    x = g["relative_depth"].to_numpy(float)
    ax.plot(x, g["value"].to_numpy(float), ls, color=color, label=label, marker=".", ms=2)
    if g["ci_low"].notna().any():
        ax.fill_between(x, g["ci_low"].to_numpy(float), g["ci_high"].to_numpy(float),
                        color=color, alpha=0.18, lw=0)  # fmt: skip


def profile_figure(table: pd.DataFrame, technique: str, out_dir: Path) -> list[Path]:
    rows = select_rows(table, technique)
    if rows.empty:
        return []
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(WIDTH, 2.4), layout="constrained")
        for i, (nm, g) in enumerate(rows.assign(_n=row_names(rows)).groupby("_n", sort=False)):
            _band(ax, g, nm, COLORS[i % 10], "-" if i < 10 else "--")
        ax.set_xlabel("relative depth")
        ax.set_ylabel(YLABEL[technique])
        ax.set_title(technique)
        fig.legend(loc="outside right upper", frameon=False, handlelength=1.2)
        return save(fig, out_dir, f"profiles_{technique}")


def findings_figure(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    from medmap.analysis.findings import CIRCULARITY_MIN, JUMP_RATIO_MIN

    def phen(metric, label=None, technique="phenomenon"):
        t = table[(table["technique"] == technique) & (table["metric"] == metric)]
        t = t[t["layer"] >= 0]
        return t if label is None else t[t["label"] == label]

    spec = phen("specialty_minus_mechanism_purity_excess")
    if spec.empty:
        spec = phen("specialty_minus_mechanism_purity")
    er = phen("effective_rank", technique="geometry")
    if len(er):
        er = er.assign(_mx=er.groupby("concept_set")["value"].transform("max"))
        er = er.assign(
            value=er["value"] / er["_mx"], ci_low=er["ci_low"] / er["_mx"],
            ci_high=er["ci_high"] / er["_mx"],
        )  # fmt: skip
    panels = [
        ("age jump ratio", phen("age_jump_ratio"), JUMP_RATIO_MIN),
        ("progression circularity", phen("progression_circularity", "mean"), CIRCULARITY_MIN),
        ("specialty − mechanism", spec, 0.0),
        ("relative effective rank", er, None),
    ]
    if all(p[1].empty for p in panels):
        return []
    with plt.rc_context(RC):
        fig, axes = plt.subplots(2, 2, figsize=(WIDTH, 2.9), sharex=True, layout="constrained")
        for ax, (title, df, thr) in zip(axes.flat, panels):
            ax.set_title(title)
            if df.empty:
                ax.text(0.5, 0.5, "not in run", ha="center", va="center", transform=ax.transAxes)
                continue
            for i, (cs, g) in enumerate(df.groupby("concept_set", sort=False)):
                _band(ax, g, str(cs), COLORS[i % 10])
            if thr is not None:
                ax.axhline(thr, color="0.5", ls=":", lw=0.8)
            if title.startswith("relative") and df["concept_set"].nunique() > 1:
                ax.legend(frameon=False, fontsize=7, handlelength=1)
        for ax in axes[1]:
            ax.set_xlabel("relative depth")
        return save(fig, out_dir, "findings")


def run_figures(
    table: pd.DataFrame,
    kmap: KnowledgeMap,
    findings: pd.DataFrame,
    out_dir: Path,
    *,
    model: str,
    spec: pd.DataFrame | None = None,
) -> list[Path]:
    """All static figures of one run into ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    t = table[table["model"].astype(str) == model] if len(table) else table
    paths = []
    for name in kmap.available(model):
        paths += map_figure(kmap, model, name, out_dir)
    for tech in TECHNIQUES:
        paths += profile_figure(t, tech, out_dir)
    if len(t):
        paths += findings_figure(t, out_dir)
    if spec is not None:
        paths += specificity_figure(spec, model, out_dir)
    return paths


def compare_figures(kmap: KnowledgeMap, cka: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Combined maps of every model stacked (shared depth axis) and one CKA heatmap per pair."""
    out_dir = Path(out_dir)
    paths = []
    mats = [(m, kmap.matrix("combined", m)) for m in kmap.models]
    mats = [(m, x) for m, x in mats if not x.empty]
    if mats:
        with plt.rc_context(RC):
            heights = [0.5 + 0.17 * len(x) for _, x in mats]
            fig, axes = plt.subplots(len(mats), 1, figsize=(WIDTH, sum(heights) + 0.4),
                                     sharex=True, squeeze=False, layout="constrained",
                                     gridspec_kw={"height_ratios": heights})  # fmt: skip
            for ax, (m, x) in zip(axes[:, 0], mats):
                im = _heat(ax, x, m)
            for ax in axes[:-1, 0]:
                ax.set_xlabel("")
            fig.colorbar(im, ax=list(axes[:, 0]), fraction=0.05, pad=0.02, label="effect")
            paths += save(fig, out_dir, "compare_map")
    if cka is not None and len(cka):
        for (ma, mb), g in cka.groupby(["model", "model_b"], sort=False):
            m = g.pivot_table(index="layer", columns="layer_b", values="value", aggfunc="mean")
            with plt.rc_context(RC):
                fig, ax = plt.subplots(figsize=(WIDTH, 3.0), layout="constrained")
                im = ax.imshow(m.to_numpy(float), origin="lower", vmin=0, vmax=1, cmap="viridis",
                               aspect="auto",
                               extent=(m.columns.min() - 0.5, m.columns.max() + 0.5,
                                       m.index.min() - 0.5, m.index.max() + 0.5))  # fmt: skip
                ax.set_xlabel(f"{mb} layer")
                ax.set_ylabel(f"{ma} layer")
                ax.set_title("linear CKA")
                fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
                paths += save(fig, out_dir, f"cka_{safe_name(ma)}__{safe_name(mb)}")
    return paths
