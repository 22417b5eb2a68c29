"""Compare several runs: side-by-side knowledge maps on relative depth, layer-to-layer linear CKA
between models on their shared items, and the findings tables in one view.

Linear CKA (Kornblith et al. 2019) of two representations ``X`` (n × d1) and ``Y`` (n × d2) of
the same ``n`` items, with ``K = Xc Xcᵀ`` and ``L = Yc Ycᵀ`` the Gram matrices of the
column-centred features::

    CKA(X, Y) = <K, L>_F / (||K||_F ||L||_F)

It is 1 for identical representations and invariant to orthogonal transforms and isotropic
scaling of either. With few items relative to the width it is biased upwards (independent
random 24 × 576 and 24 × 960 matrices give ≈ 0.97), so ``compare`` reports the *debiased* CKA
by default: the same ratio with the unbiased HSIC estimator (Song et al. 2012; Kornblith et
al. 2019, appendix) on Gram matrices ``K̃`` with zeroed diagonals::

    HSIC_u(K, L) = [tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2)) - 2/(n-2) 1ᵀK̃L̃1] / (n(n-3))

which is ≈ 0 for independent representations at any n (needs n ≥ 4). Items are matched by id: the activation store's ``item_ids`` (manifest) or,
for stores written per prompt, the prompt texts in ``prompts.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medmap.analysis.results import make_rows, relative_depth
from medmap.errors import MedmapError
from medmap.run.outputs import write_parquet_atomic, write_text_atomic


def _centred_gram(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    x = x - x.mean(axis=0, keepdims=True)
    return x @ x.T


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of ``x`` (n × d1) and ``y`` (n × d2), rows = the same items; NaN if either is
    constant."""
    k, lg = _centred_gram(x), _centred_gram(y)
    den = np.linalg.norm(k) * np.linalg.norm(lg)
    return float((k * lg).sum() / den) if den > 0 else float("nan")


def _gram(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return x @ x.T


def _hsic_u(k: np.ndarray, lg: np.ndarray) -> float:
    n = len(k)
    k, lg = k.copy(), lg.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(lg, 0.0)
    one_k, one_l = k.sum(0), lg.sum(0)
    t = (
        (k * lg).sum()
        + one_k.sum() * one_l.sum() / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one_k @ one_l)
    )
    return float(t / (n * (n - 3)))


def debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA (unbiased HSIC, see the module docstring); NaN if n < 4 or either
    representation is constant."""
    if len(x) < 4:
        return float("nan")
    k, lg = _gram(x), _gram(y)
    den = _hsic_u(k, k) * _hsic_u(lg, lg)
    return float(_hsic_u(k, lg) / np.sqrt(den)) if den > 0 else float("nan")


def cka_matrix(a: np.ndarray, b: np.ndarray, *, debiased: bool = False) -> np.ndarray:
    """CKA of every layer pair: ``a`` (n, La, d1), ``b`` (n, Lb, d2) → (La, Lb)."""
    if len(a) != len(b):
        raise ValueError(f"different numbers of items: {len(a)} vs {len(b)}")
    if debiased:
        return np.array(
            [[debiased_cka(a[:, i], b[:, j]) for j in range(b.shape[1])] for i in range(a.shape[1])]
        )

    def grams(arr: np.ndarray) -> np.ndarray:
        g = np.stack([_centred_gram(arr[:, i]) for i in range(arr.shape[1])]).reshape(
            arr.shape[1], -1
        )
        norm = np.linalg.norm(g, axis=1, keepdims=True)
        return np.divide(g, norm, out=np.full_like(g, np.nan), where=norm > 0)

    return grams(a) @ grams(b).T


def load_store(store_dir: str | Path) -> tuple[np.ndarray, list[str], list[int]]:
    """``(activations memmap (n, L, d), item ids, layer numbers)`` of one activation store."""
    store_dir = Path(store_dir)
    mf = store_dir / "manifest.json"
    if not mf.exists() or not (store_dir / "activations.npy").exists():
        raise MedmapError(f"{store_dir} is not a complete activation store")
    manifest = json.loads(mf.read_text())
    arr = np.load(store_dir / "activations.npy", mmap_mode="r")
    ids = manifest.get("item_ids")
    if ids is None and (store_dir / "prompts.json").exists():
        ids = [str(p) for p in json.loads((store_dir / "prompts.json").read_text())]
    if ids is None:
        ids = [str(i) for i in range(arr.shape[0])]
    layers = manifest.get("layers") or list(range(arr.shape[1]))
    return arr, [str(i) for i in ids], [int(x) for x in layers]


def _shared(ids_a: list[str], ids_b: list[str], max_items: int, seed: int):
    pos_b = {k: i for i, k in enumerate(ids_b)}
    pairs = [(i, pos_b[k]) for i, k in enumerate(ids_a) if k in pos_b]
    if len(pairs) > max_items:
        keep = np.sort(np.random.default_rng(seed).choice(len(pairs), max_items, replace=False))
        pairs = [pairs[i] for i in keep]
    ia = np.array([p[0] for p in pairs], dtype=int)
    ib = np.array([p[1] for p in pairs], dtype=int)
    return ia, ib


def read_run(run_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """``(results table, manifest)`` of a finished run directory."""
    run_dir = Path(run_dir)
    res = run_dir / "results.parquet"
    if not res.exists():
        raise MedmapError(
            f"{run_dir} has no results.parquet", hint="pass a directory written by `medmap map`"
        )
    mf = run_dir / "manifest.json"
    manifest = json.loads(mf.read_text()) if mf.exists() else {}
    return pd.read_parquet(res), manifest


def _model_name(table: pd.DataFrame, manifest: dict, run_dir: Path) -> str:
    if manifest.get("model"):
        return str(manifest["model"])
    if len(table):
        return str(table["model"].iloc[0])
    return run_dir.name


def cka_between_runs(
    run_a: str | Path,
    run_b: str | Path,
    *,
    model_a: str,
    model_b: str,
    n_layers_a: int,
    n_layers_b: int,
    max_items: int = 512,
    seed: int = 0,
    debiased: bool = True,
) -> pd.DataFrame:
    """Tidy CKA rows (technique ``cka``, metric ``linear_cka_debiased`` or ``linear_cka``) for
    every concept set stored in both runs: layer of ``model_a`` × ``layer_b`` of ``model_b`` on
    their shared items (at most ``max_items``, a seeded subset)."""
    run_a, run_b = Path(run_a), Path(run_b)
    sets_a = {p.name for p in (run_a / "activations").glob("*") if p.is_dir()}
    sets_b = {p.name for p in (run_b / "activations").glob("*") if p.is_dir()}
    rows = []
    for cset in sorted(sets_a & sets_b):
        try:
            a, ids_a, lay_a = load_store(run_a / "activations" / cset)
            b, ids_b, lay_b = load_store(run_b / "activations" / cset)
        except MedmapError:
            continue
        ia, ib = _shared(ids_a, ids_b, max_items, seed)
        if len(ia) < 3:
            continue
        m = cka_matrix(np.asarray(a[ia]), np.asarray(b[ib]), debiased=debiased)
        for i, la in enumerate(lay_a):
            for j, lb in enumerate(lay_b):
                rows.append(
                    {
                        "model": model_a,
                        "layer": la,
                        "relative_depth": relative_depth(la, n_layers_a),
                        "concept_set": cset,
                        "technique": "cka",
                        "metric": "linear_cka_debiased" if debiased else "linear_cka",
                        "value": m[i, j],
                        "n": len(ia),
                        "seed": seed,
                        "model_b": model_b,
                        "layer_b": lb,
                        "relative_depth_b": relative_depth(lb, n_layers_b),
                    }
                )
    return make_rows(rows) if rows else pd.DataFrame()


def seed_agreement(kmap, model_a: str, model_b: str) -> pd.DataFrame:
    """Per map row present in both runs (two runs of one model with different seeds): the
    Pearson correlation of the two normalised rows over their shared depths (``agreement``),
    ``n_depths``, and ``unstable`` = agreement < :data:`medmap.analysis.maps.UNSTABLE_BELOW`."""
    from medmap.analysis.maps import UNSTABLE_BELOW

    c = kmap.cells
    key = ["map", "concept_set", "label"]
    a = c[c["model"] == model_a].set_index([*key, "relative_depth"])["value"]
    b = c[c["model"] == model_b].set_index([*key, "relative_depth"])["value"]
    both = pd.concat({"a": a, "b": b}, axis=1).dropna()
    rows = []
    for k, g in both.groupby(level=[0, 1, 2], sort=False):
        ok = len(g) >= 3 and g["a"].std() > 0 and g["b"].std() > 0
        r = float(np.corrcoef(g["a"], g["b"])[0, 1]) if ok else float("nan")
        rows.append(
            dict(zip(key, k)) | {"model_a": model_a, "model_b": model_b, "agreement": r,
                                 "n_depths": len(g),
                                 "unstable": bool(np.isfinite(r) and r < UNSTABLE_BELOW)}
        )  # fmt: skip
    cols = [*key, "model_a", "model_b", "agreement", "n_depths", "unstable"]
    return pd.DataFrame(rows, columns=cols)


def compare_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    max_items: int = 512,
    seed: int = 0,
    figures: bool = True,
    debiased: bool = True,
) -> Path:
    """Compare runs; writes ``out_dir/compare.html``, ``compare.parquet`` (CKA rows),
    ``figures/`` and, for runs of one model (e.g. two seeds), ``seed_agreement.parquet``
    (:func:`seed_agreement`). Returns the path of ``compare.html``."""
    from medmap.analysis.findings import findings_table
    from medmap.analysis.maps import knowledge_map, set_roles
    from medmap.report.html import compare_html
    from medmap.run.rundir import Run

    run_dirs = [Path(r) for r in run_dirs]
    if len(run_dirs) < 1:
        raise MedmapError("compare needs at least one run directory")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for rd in run_dirs:
        table, manifest = read_run(rd)
        name = _model_name(table, manifest, rd)
        n_layers = int(manifest.get("n_layers") or 0) or knowledge_map(table).n_layers.get(name, 1)
        runs.append({"dir": rd, "table": table, "manifest": manifest, "model": name, "L": n_layers})
    names = [r["model"] for r in runs]
    same = {n for n in names if names.count(n) > 1}
    if len(set(names)) < len(names):  # same model twice: tell the runs apart
        for r in runs:
            r["model"] = f"{r['model']} ({r['dir'].name})"
            r["table"] = r["table"].assign(model=r["model"])
    table = pd.concat([r["table"] for r in runs], ignore_index=True)
    roles = [set_roles(Run(r["dir"])) for r in runs]  # each run's sets, by their metadata
    medical = sorted({s for ro in roles for s in ro["medical"]})
    control = sorted({s for ro in roles for s in ro["control"]})
    n_layers = {r["model"]: r["L"] for r in runs}
    kmap = knowledge_map(table, seed=seed, medical=medical, control=control, n_layers=n_layers)
    findings = findings_table(table, kmap, medical=medical, seed=seed)
    cka = [
        cka_between_runs(
            ra["dir"],
            rb["dir"],
            model_a=ra["model"],
            model_b=rb["model"],
            n_layers_a=ra["L"],
            n_layers_b=rb["L"],
            max_items=max_items,
            seed=seed,
            debiased=debiased,
        )
        for k, ra in enumerate(runs)
        for rb in runs[k + 1 :]
    ]
    # runs of one model (e.g. two seeds): how well each map row agrees between them
    agree = [
        seed_agreement(kmap, ra["model"], rb["model"])
        for k, ra in enumerate(runs)
        for rb in runs[k + 1 :]
        if ra["model"].rsplit(" (", 1)[0] in same and rb["model"].rsplit(" (", 1)[0] in same
        and ra["model"].rsplit(" (", 1)[0] == rb["model"].rsplit(" (", 1)[0]
    ]  # fmt: skip
    if agree:
        write_parquet_atomic(
            pd.concat(agree, ignore_index=True), out_dir / "seed_agreement.parquet"
        )
    cka = [c for c in cka if len(c)]
    cka_df = pd.concat(cka, ignore_index=True) if cka else make_rows([])
    write_parquet_atomic(cka_df, out_dir / "compare.parquet")
    if figures:
        from medmap.report.figures import compare_figures

        compare_figures(kmap, cka_df, out_dir / "figures")
    path = out_dir / "compare.html"
    return write_text_atomic(path, compare_html(runs, kmap, findings, cka_df))
