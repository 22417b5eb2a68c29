"""The report's safety with hostile labels and names, and the static figures for papers."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from medmap.analysis.compare import compare_runs
from medmap.analysis.findings import findings_table
from medmap.analysis.maps import knowledge_map
from medmap.report.figures import WIDTH, run_figures
from medmap.report.html import build_report
from medmap.report.synthetic import make_synthetic_run, synthetic_table

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
EVIL = SCRIPT + IMG


def make_malicious_run(path: Path, model: str, n_layers: int) -> Path:
    """A run whose model name, a concept-set name, a label name, label values and item names
    all carry markup."""
    return make_synthetic_run(
        path,
        model=model,
        n_layers=n_layers,
        n_items=12,
        label=EVIL,  # label name of the probe rows
        label_values=(SCRIPT, IMG, "plain"),  # label values in the UMAP coordinates
        item_prefix=EVIL,  # item (concept) names: UMAP hover text
        sets=(EVIL, "ages", "drugs", "progression", "countries"),
    )


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evil")
    a = make_malicious_run(root / "a", "model " + EVIL, 6)
    b = make_malicious_run(root / "b", IMG + " other " + SCRIPT, 9)
    with warnings.catch_warnings():  # long hostile names squeeze the axes of the figures
        warnings.filterwarnings("ignore", "constrained_layout not applied", UserWarning)
        report = build_report(a, figures=True)
    compare = compare_runs([a, b], root / "cmp", figures=False)
    return report, compare


_DECODER = json.JSONDecoder()


def plotly_figures(text: str) -> list:
    """The (data, layout, config) arguments of every ``Plotly.newPlot`` call, JSON-decoded."""
    out = []
    for m in re.finditer(r'Plotly\.newPlot\(\s*"[^"]*",\s*', text):
        i, args = m.end(), []
        for _ in range(3):
            obj, i = _DECODER.raw_decode(text, i)
            args.append(obj)
            while text[i] in ", \n\t":
                i += 1
        out.append(args)
    return out


def strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def test_hostile_strings_are_escaped_in_report_and_comparison(pages):
    for page in pages:
        text = page.read_text()
        for raw in (SCRIPT, IMG, "<script>alert", "<img src"):
            assert raw not in text, (page.name, raw)
        # the escaped forms are there: the data was shown, not dropped
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in text  # esc() in HTML text
        # inside the plotly JSON: after JSON decoding, still no raw tag (plotly draws these)
        figs = plotly_figures(text)
        assert len(figs) == int(re.search(r'data-figures="(\d+)"', text).group(1))
        seen = 0
        for fig in figs:
            for s in strings(fig):
                if "alert(1)" in s:
                    seen += 1
                    assert "<script" not in s and "<img" not in s, (page.name, s[:200])
                    assert "&lt;" in s
        assert seen > 0
        # the only <script> elements are plotly.js itself and one per figure
        assert text.count("<script") == 1 + len(figs)


def test_hostile_strings_reach_hover_text_escaped(pages):
    report, compare = pages
    figs = plotly_figures(report.read_text())
    hover = [s for f in figs for tr in f[0] for s in strings(tr.get("hovertext", []))]
    assert any("&lt;script&gt;alert(1)&lt;/script&gt;" in s for s in hover)  # item names
    assert any('"&gt;&lt;img src=x onerror=alert(1)&gt;' in s for s in hover)  # label values
    assert all("<b>" in s for s in hover)  # the report's own markup survives
    cfigs = plotly_figures(compare.read_text())
    titles = [s for f in cfigs for s in strings(f[1].get("annotations", []))]
    assert any("model &lt;script&gt;" in s for s in titles)  # model names (subplot titles)


def test_hostile_strings_in_figures(pages):
    report, _ = pages
    svgs = list((report.parent / "figures").glob("*.svg"))
    assert svgs
    for svg in svgs:
        text = svg.read_text()
        assert "<script" not in text and "<img" not in text, svg.name
    assert any("&lt;script&gt;alert(1)" in svg.read_text() for svg in svgs)


# ---------------------------------------------------------------------------------------------
# Static figures


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("figs")
    table = synthetic_table("fig-model", 8)
    kmap = knowledge_map(table)
    paths = run_figures(table, kmap, findings_table(table, kmap), out, model="fig-model")
    return out, paths


def test_run_figures_writes_every_figure(figures):
    out, paths = figures
    names = {p.name for p in paths}
    stems = ["knowledge_map", "findings"]
    stems += [f"knowledge_map_{t}" for t in ("representation", "saliency", "lesion", "patching")]
    stems += [f"profiles_{t}" for t in ("representation", "saliency", "lesion", "patching")]
    for stem in stems:
        for ext in ("png", "svg"):
            assert f"{stem}.{ext}" in names
            p = out / f"{stem}.{ext}"
            assert p.exists() and p.stat().st_size > 10_000, p.name
    assert {p.name for p in out.iterdir()} == names


def test_figures_are_300_dpi_at_column_width(figures):
    image = pytest.importorskip("PIL.Image")
    out, paths = figures
    for p in paths:
        if p.suffix == ".png":
            with image.open(p) as im:
                dpi = im.info["dpi"]
                w, h = im.size
                assert round(dpi[0]) == 300 and round(dpi[1]) == 300, p.name
                assert w / dpi[0] == pytest.approx(3.5, abs=0.01), p.name
                assert WIDTH == 3.5 and 1.0 < h / dpi[1] < 6.0
                # not blank: many distinct colours
                assert len(im.convert("RGB").getcolors(1 << 24)) > 50
        else:
            text = p.read_text()
            assert re.search(r'<svg[^>]*width="252pt"', text), p.name  # 3.5 in × 72 pt
            sizes = [float(s) for s in re.findall(r"font-size: ?([\d.]+)px", text)]
            assert sizes and min(sizes) >= 7, p.name  # legible at column width


def test_report_shows_calibration_when_the_run_holds_it(tmp_path):
    """A run directory with ``medmap calibrate`` results gets a calibration section; one without
    gets none."""
    import shutil

    example = Path(__file__).parents[1] / "docs" / "examples" / "calibration-smollm2-135m"
    plain = make_synthetic_run(tmp_path / "plain", model="m", n_layers=6, n_items=12)
    html_plain = build_report(plain, figures=False).read_text()
    assert 'id="calibration"' not in html_plain
    run = make_synthetic_run(tmp_path / "cal", model="m", n_layers=6, n_items=12)
    for f in example.glob("calibration*.parquet"):
        shutil.copy(f, run / f.name)
    text = build_report(run, figures=False).read_text()
    assert 'id="calibration"' in text and "Calibration: planted facts" in text
    assert 'id="edit-test"' not in text
