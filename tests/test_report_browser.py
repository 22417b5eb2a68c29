"""The report in headless Chromium: renders offline, no console errors, working UMAP slider."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medmap.report.html import build_report
from medmap.report.synthetic import make_synthetic_run

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run = make_synthetic_run(tmp_path_factory.mktemp("run") / "r", n_layers=6, n_items=18)
    return build_report(run, figures=False)


def test_report_renders_offline_with_working_slider(report: Path):
    sync_api = pytest.importorskip("playwright.sync_api")  # installed with the test extra
    assert Path(CHROMIUM).exists(), "apt-get install chromium"
    n_figures = int(re.search(r'data-figures="(\d+)"', report.read_text()).group(1))
    assert n_figures >= 10
    errors: list[str] = []
    blocked: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))

        def route(r):
            if r.request.url.startswith(("file://", "data:")):
                r.continue_()
            else:
                blocked.append(r.request.url)
                r.abort()

        page.route("**/*", route)
        page.goto(report.as_uri(), wait_until="load")
        page.wait_for_function(
            f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n_figures}",
            timeout=30_000,
        )
        plots = page.locator(".js-plotly-plot")
        assert plots.count() == n_figures
        for i in range(n_figures):
            assert plots.nth(i).locator(".main-svg").count() >= 1, f"figure {i} not drawn"

        # UMAP slider: the first UMAP figure; click the last step of the slider rail
        gd = "document.querySelector('#umap .js-plotly-plot')"
        before = page.evaluate(
            f"() => {{const g = {gd}; return [g.layout.sliders[0].active, Array.from(g._fullData[0].x)];}}"
        )
        assert before[0] == 0
        umap = page.locator("#umap .js-plotly-plot").first
        umap.scroll_into_view_if_needed()
        rail = umap.locator(".slider-rail-rect").first
        box = rail.bounding_box()
        page.mouse.click(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
        page.wait_for_timeout(500)
        after = page.evaluate(
            f"() => {{const g = {gd}; return [g.layout.sliders[0].active, Array.from(g._fullData[0].x),"
            " g.layout.sliders[0].steps.length];}"
        )
        assert after[0] == after[2] - 1  # the last layer is shown
        assert after[1] != before[1]  # the points moved
        label = umap.locator(".slider-group > .slider-label").first.text_content()
        assert label.strip() == f"layer {after[2] - 1}"

        ARTIFACTS.mkdir(exist_ok=True)
        umap.screenshot(path=str(ARTIFACTS / "report_umap.png"))
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=False)
        browser.close()
    assert blocked == []
    assert errors == []


SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
EVIL = SCRIPT + IMG


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, Path]:
    """report.html and compare.html of runs whose names and labels carry markup."""
    from medmap.analysis.compare import compare_runs

    root = tmp_path_factory.mktemp("hostile")
    kw = {
        "n_items": 12,
        "label": EVIL,
        "label_values": (SCRIPT, IMG, "plain"),
        "item_prefix": EVIL,
        "sets": (EVIL, "ages", "drugs", "progression", "countries"),
    }
    a = make_synthetic_run(root / "a", model="model " + EVIL, n_layers=6, **kw)
    b = make_synthetic_run(root / "b", model=IMG + " other " + SCRIPT, n_layers=9, **kw)
    return build_report(a, figures=False), compare_runs([a, b], root / "cmp", figures=False)


def _only(uri: str, seen: list[str]):
    """A route handler that lets the page itself load and aborts (and records) the rest."""

    def route(r):
        seen.append(r.request.url)
        if r.request.url == uri:
            r.continue_()
        else:
            r.abort()

    return route


def test_hostile_labels_run_no_script(hostile):
    sync_api = pytest.importorskip("playwright.sync_api")
    assert Path(CHROMIUM).exists(), "apt-get install chromium"
    dialogs: list[str] = []
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        for html in hostile:
            page = browser.new_page(viewport={"width": 1200, "height": 900})

            def on_dialog(d):
                dialogs.append(f"{d.type}: {d.message}")
                d.dismiss()

            page.on("dialog", on_dialog)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            page.route("**/*", _only(html.as_uri(), requests))
            page.goto(html.as_uri(), wait_until="load")
            n = int(re.search(r'data-figures="(\d+)"', html.read_text()).group(1))
            page.wait_for_function(
                f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n}",
                timeout=30_000,
            )
            page.wait_for_timeout(200)
            assert dialogs == [], f"{html.name}: script from the data ran"
            # the hostile strings are shown as text: the heading holds the model name(s)
            assert EVIL in page.locator("h1").first.text_content()
            # and as text in plotly: axis tick labels (entities decoded, no element made)
            ticks = page.evaluate(
                "() => Array.from(document.querySelectorAll('.ytick text'), t => t.textContent)"
            )
            assert any(SCRIPT in t for t in ticks)
            # hover a point of every scatter trace and the middle of every plot
            hover = page.evaluate(
                """() => {
                  const out = [];
                  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
                    gd.data.forEach((tr, i) => {
                      if (tr.type === 'scatter' && tr.hovertext && tr.visible !== false) {
                        Plotly.Fx.hover(gd, [{curveNumber: i, pointNumber: 0}]);
                        out.push(gd.querySelector('.hoverlayer').textContent);
                      }
                    });
                  }
                  return out;
                }"""
            )
            for plot in page.locator(".js-plotly-plot .nsewdrag").all():
                box = plot.bounding_box()
                if box:
                    plot.scroll_into_view_if_needed()
                    box = plot.bounding_box()
                    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
                    page.wait_for_timeout(50)
            page.wait_for_timeout(300)
            bad = page.evaluate(
                "() => document.querySelectorAll('[onerror], img, iframe, object, embed').length"
            )
            scripts = page.evaluate("() => document.scripts.length")
            assert bad == 0
            assert scripts == 1 + n  # plotly.js and one per figure, nothing injected
            if html.name == "report.html":
                assert hover and any(SCRIPT in h for h in hover), hover[:3]
            page.close()
        browser.close()
    assert dialogs == []
    assert errors == []
    assert [u for u in requests if not u.endswith(".html")] == []
