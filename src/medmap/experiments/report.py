"""HTML fragments and figures of the experiments, for the run report.

:func:`calibration_section` and :func:`edit_test_section` read a run directory written by
``medmap calibrate`` / ``medmap edit-test``, draw their figures there (matplotlib, PNG + SVG,
3.5 in wide) and return a self-contained ``<section>`` (figures embedded as base64 PNG, so the
fragment works wherever it is pasted). Both return ``""`` when the directory has no results of
that experiment, so a report can call them unconditionally.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

RC = {"font.size": 7, "axes.titlesize": 7.5, "axes.labelsize": 7, "legend.fontsize": 6.5}


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'
    )


def _save(fig, run: Path, name: str) -> Path:
    png = run / f"{name}.png"
    fig.savefig(png, dpi=200, bbox_inches="tight")
    fig.savefig(run / f"{name}.svg", bbox_inches="tight")
    plt.close(fig)
    return png


def _fmt(v: float, lo: float, hi: float) -> str:
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def calibration_figure(run: str | Path) -> Path | None:
    """``calibration.{png,svg}``: ±1-block accuracy per technique × site, null-subtracted vs
    unedited control, 95 % CIs, and the random-block baseline; ``None`` without results."""
    run = Path(run)
    path = run / "calibration_summary.parquet"
    if not path.exists():
        return None
    s = pd.read_parquet(path)
    s = s[s["metric"] == "accuracy_pm1"]
    if s.empty:
        return None
    names = sorted(
        {(t.removeprefix("calibration_"), site) for t, site in zip(s["technique"], s["site"])}
    )
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(3.5, 0.35 * len(names) + 0.9))
        y = np.arange(len(names))
        for off, label, color in (
            (-0.15, "null_subtracted", "C0"),
            (0.15, "unedited_control", "C7"),
        ):
            g = s[s["label"] == label].set_index(["technique", "site"])
            v, lo, hi = [], [], []
            for t, site in names:
                r = g.loc[(f"calibration_{t}", site)]
                v.append(r["value"])
                lo.append(r["value"] - r["ci_low"])
                hi.append(r["ci_high"] - r["value"])
            ax.errorbar(v, y + off, xerr=[lo, hi], fmt="o", ms=3, color=color,
                        label=label.replace("_", " "), capsize=1.5)  # fmt: skip
        base = s.groupby(["technique", "site"])["baseline"].first()
        for i, (t, site) in enumerate(names):
            b = base[(f"calibration_{t}", site)]
            ax.plot([b, b], [i - 0.35, i + 0.35], color="k", lw=0.8, ls=":",
                    label="random block" if i == 0 else None)  # fmt: skip
        ax.set_yticks(y, [f"{t} ({site})" for t, site in names])
        ax.set_xlim(-0.05, 1.05)
        ax.set_xlabel("found within ±1 block of the planted block")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, frameon=False)
        ax.set_title(str(s["model"].iloc[0]))
        return _save(fig, run, "calibration")


def calibration_section(run: str | Path, *, write: bool = False) -> str:
    """The calibration ``<section>`` of ``run`` (``""`` without results); ``write`` also saves
    it as ``run/calibration_section.html``."""
    run = Path(run)
    if not (run / "calibration_summary.parquet").exists():
        return ""
    s = pd.read_parquet(run / "calibration_summary.parquet")
    checks = pd.read_parquet(run / "calibration_checks.parquet")
    fig = calibration_figure(run)
    rows = []
    for (t, site), g in s.groupby(["technique", "site"], sort=True):
        cell = {}
        for (metric, label), r in g.set_index(["metric", "label"]).iterrows():
            cell[(metric, label)] = _fmt(r["value"], r["ci_low"], r["ci_high"])
        n = int(g["n"].iloc[0])
        rows.append(
            f"<tr><td>{html.escape(t.removeprefix('calibration_'))}</td><td>{html.escape(site)}</td>"
            f"<td>{cell.get(('accuracy_pm1', 'null_subtracted'), '')}</td>"
            f"<td>{cell.get(('accuracy_pm1', 'unedited_control'), '')}</td>"
            f"<td>{g['baseline'].iloc[0]:.2f}</td>"
            f"<td>{cell.get(('mae_blocks', 'null_subtracted'), '')}</td>"
            f"<td>{cell.get(('mae_blocks', 'unedited_control'), '')}</td><td>{n}</td></tr>"
        )
    chk = "".join(
        f"<tr><td>{int(r['planted_block'])}</td><td>{r['heldout_learned']:.2f}</td>"
        f"<td>{r['heldout_margin']:.2f}</td><td>{r['margin_before']:.2f}</td>"
        f"<td>{r.get('control_margin_change', float('nan')):.2f}</td></tr>"
        for _, r in checks.iterrows()
    )
    model = html.escape(str(s["model"].iloc[0]))
    out = (
        "<section id='calibration'><h2>Calibration: planted facts</h2>"
        f"<p>Fictional drug facts were written into one block at a time of {model} (only that "
        "block's MLP trained) and every technique was asked where they are, on held-out "
        "paraphrases. <em>Found</em> = the peak of the edited profile minus the unedited "
        "model's profile on the same prompts; the <em>unedited control</em> is the unedited "
        "profile's own peak (no fact planted: agreement there is chance or a generic bias). "
        "95% bootstrap CIs over facts × planted blocks; only facts the edit taught (held-out "
        "forced choice won) are counted.</p>"
        + (_img(fig, "calibration accuracy") if fig else "")
        + "<table><tr><th>technique</th><th>site</th><th>±1 accuracy</th>"
        "<th>±1 accuracy, unedited</th><th>random block</th><th>MAE (blocks)</th>"
        "<th>MAE, unedited</th><th>n</th></tr>" + "".join(rows) + "</table>"
        "<h3>Edit checks</h3><table><tr><th>planted block</th><th>held-out learned</th>"
        "<th>held-out margin (nats)</th><th>margin before</th><th>control-set margin change"
        "</th></tr>" + chk + "</table></section>"
    )
    if write:
        (run / "calibration_section.html").write_text(out, encoding="utf-8")
    return out


def edit_test_figure(run: str | Path) -> Path | None:
    """``edit_test.{png,svg}``: forgetting, collateral and selectivity per block choice (95 %
    CIs over runs); ``None`` without results."""
    run = Path(run)
    path = run / "edit_test_summary.parquet"
    if not path.exists():
        return None
    s = pd.read_parquet(path)
    choices = [c for c in ("map", "random", "least") if c in set(s["label"])]
    metrics = [("forget_drop", "held-out forgetting"), ("control_drop", "control collateral"),
               ("selectivity", "selectivity")]  # fmt: skip
    with plt.rc_context(RC):
        fig, axes = plt.subplots(1, 3, figsize=(3.5, 1.5), sharey=True)
        for ax, (metric, title) in zip(axes, metrics):
            g = s[s["metric"] == metric].set_index("label")
            for i, c in enumerate(choices):
                r = g.loc[c]
                ax.errorbar([r["value"]], [i], xerr=[[r["value"] - r["ci_low"]],
                            [r["ci_high"] - r["value"]]], fmt="o", ms=3, capsize=1.5)  # fmt: skip
            ax.axvline(0, color="k", lw=0.5)
            ax.set_title(title)
            ax.set_xlabel("nats")
        axes[0].set_yticks(range(len(choices)), choices)
        return _save(fig, run, "edit_test")


def edit_test_section(run: str | Path, *, write: bool = False) -> str:
    """The map-guided editing ``<section>`` of ``run`` (``""`` without results); ``write``
    also saves it as ``run/edit_test_section.html``."""
    run = Path(run)
    if not (run / "edit_test_summary.parquet").exists():
        return ""
    s = pd.read_parquet(run / "edit_test_summary.parquet")
    t = pd.read_parquet(run / "edit_test.parquet")
    fig = edit_test_figure(run)
    piv = s.pivot_table(index="label", columns="metric", values="value", aggfunc="first")
    rows = []
    for label in piv.index:
        g = s[s["label"] == label].set_index("metric")
        cells = "".join(
            f"<td>{_fmt(g.loc[m, 'value'], g.loc[m, 'ci_low'], g.loc[m, 'ci_high'])}</td>"
            for m in ("forget_drop", "control_drop", "neutral_increase", "selectivity", "ratio")
        )
        rows.append(f"<tr><td>{html.escape(label)}</td>{cells}<td>{int(g['n'].iloc[0])}</td></tr>")
    model = html.escape(str(t["model"].iloc[0]))
    cset = html.escape(str(t["concept_set"].iloc[0]))
    k = int(t["k"].iloc[0])
    out = (
        "<section id='edit-test'><h2>Map-guided editing</h2>"
        f"<p>Facts of <code>{cset}</code> that {model} knows were unlearned (gradient descent on "
        f"their forced-choice margin with a retain term on control facts) in {k} blocks: the "
        "map's top blocks, random blocks, or the map's lowest blocks, with the same steps and "
        "learning rate. Forgetting is measured on held-out facts of the set (never trained "
        "on), collateral on held-out control facts and neutral prose. Margins in nats; 95% "
        "bootstrap CIs over runs (seeds; seeds × draws for random); contrast rows are "
        "two-sample bootstraps.</p>"
        + (_img(fig, "edit test") if fig else "")
        + "<table><tr><th>choice</th><th>forgetting</th><th>control collateral</th>"
        "<th>neutral NLL increase</th><th>selectivity</th><th>ratio</th><th>n</th></tr>"
        + "".join(rows)
        + "</table></section>"
    )
    if write:
        (run / "edit_test_section.html").write_text(out, encoding="utf-8")
    return out
