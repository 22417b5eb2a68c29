"""Linear CKA, `medmap compare` on runs of different depth, and the run-reading CLI commands
(`compare`, `report`, `query`) including their one-line errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medmap.analysis.compare import cka_matrix, compare_runs, debiased_cka, linear_cka
from medmap.cli import main
from medmap.report.synthetic import make_synthetic_run


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from the HSIC estimator (Gretton et al. 2005; Kornblith et al. 2019, eq. 3):
    HSIC(K, L) = tr(K H L H) / (n - 1)², K = X Xᵀ and L = Y Yᵀ on *uncentred* features,
    H = I - 11ᵀ/n the centring matrix; CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, lg = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, lg) / np.sqrt(hsic(k, k) * hsic(lg, lg)))


def feature_cka(x: np.ndarray, y: np.ndarray) -> float:
    """The feature-space form: ||Ycᵀ Xc||²_F / (||Xcᵀ Xc||_F ||Ycᵀ Yc||_F)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return float(
        np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    )


def orthogonal(d: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------------------------------------
# linear_cka


def test_cka_is_one_under_rotation_scaling_and_translation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12)) + 5.0
    q = orthogonal(12, rng)
    assert np.allclose(q @ q.T, np.eye(12))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.7 * x @ q) == pytest.approx(1.0)
    assert linear_cka(x, 0.01 * x @ q - 42.0) == pytest.approx(1.0)
    # an isometric embedding into more dimensions (orthonormal rows) keeps the Gram matrix
    w = orthogonal(30, rng)[:12]
    assert linear_cka(x, x @ w) == pytest.approx(1.0)
    # but a non-isotropic scaling changes it
    assert linear_cka(x, x * np.linspace(0.1, 10, 12)) < 0.99


def test_cka_symmetric_and_in_unit_interval():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(40, 9))
    y[:, 0] += 2 * x[:, 0]
    v = linear_cka(x, y)
    assert v == pytest.approx(linear_cka(y, x), rel=1e-12)
    assert 0 < v < 1


def test_cka_near_zero_for_independent_matrices():
    rng = np.random.default_rng(2)
    n, d1, d2 = 3000, 6, 8
    v = linear_cka(rng.normal(size=(n, d1)), rng.normal(size=(n, d2)))
    # E[CKA] ~ sqrt(d1 d2) / n for independent Gaussians: ~0.002 here
    assert 0 <= v < 0.02


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_cka_matches_hsic_and_feature_space_formulas(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(25, 7)) + rng.normal(size=7)  # non-zero means: centring matters
    y = np.tanh(x @ rng.normal(size=(7, 4))) + rng.normal(0, 0.3, size=(25, 4)) + 1.0
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-9)
    assert linear_cka(x, y) == pytest.approx(feature_cka(x, y), rel=1e-9)


def test_cka_constant_is_nan_and_matrix_matches_pairs():
    rng = np.random.default_rng(6)
    assert np.isnan(linear_cka(np.ones((10, 3)), rng.normal(size=(10, 3))))
    a, b = rng.normal(size=(15, 3, 6)), rng.normal(size=(15, 4, 5))
    b[:, 2] = a[:, 1, :5]  # a related pair
    m = cka_matrix(a, b)
    assert m.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert m[i, j] == pytest.approx(linear_cka(a[:, i], b[:, j]), rel=1e-9)
    with pytest.raises(ValueError, match="different numbers of items"):
        cka_matrix(a, b[:10])


# ---------------------------------------------------------------------------------------------
# compare_runs


def _store(run: Path, cset: str) -> tuple[np.ndarray, list[str], dict]:
    d = run / "activations" / cset
    mf = json.loads((d / "manifest.json").read_text())
    return np.load(d / "activations.npy"), mf["item_ids"], mf


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    a = make_synthetic_run(root / "six", model="six", n_layers=6, n_items=20, d_model=10)
    b = make_synthetic_run(root / "nine", model="nine", n_layers=9, n_items=30, d_model=14, seed=1)
    # B holds items 000..029 in a shuffled order: only 000..019 are shared with A, matched by id
    for cset in ("ages", "drugs", "progression", "countries"):
        acts, ids, mf = _store(b, cset)
        perm = np.random.default_rng(7).permutation(len(ids))
        np.save(b / "activations" / cset / "activations.npy", acts[perm])
        mf["item_ids"] = [ids[i] for i in perm]
        (b / "activations" / cset / "manifest.json").write_text(json.dumps(mf))
    shutil.rmtree(b / "activations" / "animals")  # a set stored in one run only: no CKA
    return a, b


def test_compare_runs_of_different_depth(runs, tmp_path):
    a, b = runs
    out = tmp_path / "cmp"
    path = compare_runs([a, b], out, debiased=False)
    assert path == out / "compare.html"
    html = path.read_text()
    assert "six" in html and "nine" in html and html.count("Plotly.newPlot") >= 6
    cka = pd.read_parquet(out / "compare.parquet")
    assert set(cka["concept_set"]) == {"ages", "drugs", "progression", "countries"}
    assert set(cka["model"]) == {"six"} and set(cka["model_b"]) == {"nine"}
    assert (cka["technique"] == "cka").all() and (cka["metric"] == "linear_cka").all()
    assert len(cka) == 4 * 7 * 10  # layers 0..6 × 0..9 per shared concept set
    np.testing.assert_allclose(cka["relative_depth"], cka["layer"] / 6)
    np.testing.assert_allclose(cka["relative_depth_b"], cka["layer_b"] / 9)
    assert (cka["n"] == 20).all()  # the shared items only
    assert cka["value"].between(0, 1 + 1e-9).all()
    # recompute on the items aligned by id, independently of compare.py's matching
    for cset in ("drugs", "countries"):
        xa, ids_a, _ = _store(a, cset)
        xb, ids_b, _ = _store(b, cset)
        pos = {k: i for i, k in enumerate(ids_b)}
        xb = xb[[pos[k] for k in ids_a]]
        got = cka[cka["concept_set"] == cset].set_index(["layer", "layer_b"])["value"]
        for la in range(7):
            for lb in range(10):
                assert got[(la, lb)] == pytest.approx(hsic_cka(xa[:, la], xb[:, lb]), rel=1e-6)
    figs = {p.name for p in (out / "figures").iterdir()}
    assert {"compare_map.png", "compare_map.svg", "cka_six__nine.png", "cka_six__nine.svg"} <= figs
    for name in figs:
        assert (out / "figures" / name).stat().st_size > 5_000


def test_compare_same_model_twice_and_single_run(runs, tmp_path):
    a, _ = runs
    path = compare_runs([a, a], tmp_path / "twice", figures=False)
    cka = pd.read_parquet(tmp_path / "twice" / "compare.parquet")
    # the same activations: CKA of each layer with itself is 1
    diag = cka[cka["layer"] == cka["layer_b"]]
    np.testing.assert_allclose(diag["value"], 1.0)
    assert "six (six)" in path.read_text()
    compare_runs([a], tmp_path / "one", figures=False)
    assert (tmp_path / "one" / "compare.html").exists()
    assert len(pd.read_parquet(tmp_path / "one" / "compare.parquet")) == 0


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_compare(runs, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "cli-cmp"
    assert main(["compare", str(a), str(b), "--out", str(out), "--max-items", "12"]) == 0
    assert (out / "compare.html").exists() and (out / "figures" / "compare_map.png").exists()
    cka = pd.read_parquet(out / "compare.parquet")
    assert (cka["n"] == 12).all()  # a seeded subset of the 20 shared items
    assert "compare.html" in capsys.readouterr().out


def test_cli_report_rebuilds(tmp_path):
    run = make_synthetic_run(tmp_path / "run", n_layers=4, n_items=10)
    assert not (run / "report.html").exists()
    assert main(["report", str(run), "--no-figures"]) == 0
    html = (run / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "synthetic-10" in html
    assert (run / "knowledge_map.parquet").exists() and (run / "findings.parquet").exists()
    assert not (run / "figures").exists()
    (run / "report.html").write_text("stale")
    assert main(["report", str(run), "--no-figures"]) == 0
    assert (run / "report.html").read_text() == html


def test_cli_query(runs, tmp_path, capsys):
    a, b = runs
    sql = "select model, concept_set, count(*) as n from results group by 1, 2 order by 1, 2"
    assert main(["query", str(a), str(b), sql, "--format", "csv"]) == 0
    got = pd.read_csv(io.StringIO(capsys.readouterr().out))
    t = pd.concat([pd.read_parquet(r / "results.parquet") for r in (a, b)])
    want = t.groupby(["model", "concept_set"]).size().reset_index(name="n")
    want = want.sort_values(["model", "concept_set"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert main(["query", str(a), "select distinct run_dir from results", "-f", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"run_dir": str(a.resolve())}]
    assert main(["query", str(a), "select count(*) as n from coords"]) == 0
    assert "1 rows" in capsys.readouterr().out


def _one_line_error(capsys, argv: list[str], *expect: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert "Traceback" not in err
    for e in expect:
        assert e in err


def test_cli_bad_inputs(runs, tmp_path, capsys):
    a, _ = runs
    empty = tmp_path / "not-a-run" / "with a rather long name so the message exceeds eighty chars"
    empty.mkdir(parents=True)
    out = str(tmp_path / "o")
    _one_line_error(capsys, ["compare", str(a), str(empty), "--out", out], "results.parquet")
    _one_line_error(capsys, ["compare", "--out", out], "RUN_DIR")
    _one_line_error(capsys, ["report", str(empty)], "results.parquet")
    _one_line_error(capsys, ["report", str(tmp_path / "missing")], "results.parquet")
    _one_line_error(capsys, ["query", str(empty), "select 1"], "results.parquet")
    _one_line_error(capsys, ["query"], "RUN_DIR")
    _one_line_error(capsys, ["query", str(a)], "RUN_DIR")
    _one_line_error(capsys, ["query", str(a), "selec nonsense"], "query failed")
    # a usage error (missing required option) is still exit 2
    assert main(["compare", str(a)]) == 2


def _hsic_u_bruteforce(k: np.ndarray, lg: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC as the explicit U-statistic over distinct 4-tuples."""
    import itertools

    n = len(k)
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * lg[i, j] + k[i, j] * lg[q, r] - 2 * k[i, j] * lg[i, q]
    return total / (n * (n - 1) * (n - 2) * (n - 3))


def test_debiased_cka_is_the_u_statistic_and_unbiased_for_few_items():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 4))
    kx, ky = x @ x.T, y @ y.T
    want = _hsic_u_bruteforce(kx, ky) / np.sqrt(
        _hsic_u_bruteforce(kx, kx) * _hsic_u_bruteforce(ky, ky)
    )
    assert debiased_cka(x, y) == pytest.approx(want, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert debiased_cka(x, 2.5 * x @ q) == pytest.approx(1.0)
    # 24 items, widths 576 and 960: the plain estimator is near 1 for unrelated data
    a, b = rng.normal(size=(24, 576)), rng.normal(size=(24, 960))
    assert linear_cka(a, b) > 0.9
    assert abs(debiased_cka(a, b)) < 0.1
    m = cka_matrix(np.stack([a[:, :50], a[:, 50:100]], 1), np.stack([a[:, :50]], 1), debiased=True)
    assert m.shape == (2, 1) and m[0, 0] == pytest.approx(1.0) and abs(m[1, 0]) < 0.2
    assert np.isnan(debiased_cka(x[:3], y[:3]))


def test_compare_reports_debiased_cka_by_default(runs, tmp_path):
    a, b = runs
    compare_runs([a, b], tmp_path / "cmp", figures=False)
    cka = pd.read_parquet(tmp_path / "cmp" / "compare.parquet")
    assert (cka["metric"] == "linear_cka_debiased").all()
    xa, ids_a, _ = _store(a, "drugs")
    xb, ids_b, _ = _store(b, "drugs")
    pos = {k: i for i, k in enumerate(ids_b)}
    xb = xb[[pos[k] for k in ids_a]]
    got = cka[cka["concept_set"] == "drugs"].set_index(["layer", "layer_b"])["value"]
    assert got[(2, 3)] == pytest.approx(debiased_cka(xa[:, 2], xb[:, 3]), rel=1e-9)
