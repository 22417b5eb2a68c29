"""Cluster and probe scores of one layer's item features, with shuffled baselines and CIs.

Categorical labels (technique ``cluster`` and ``probe``):

- ``knn_purity``: mean over items of the fraction of an item's ``k`` nearest neighbours
  (cosine distance in the layer's feature space, the item itself excluded) that share its label;
  ``k = min(10, n - 1)``.
- ``silhouette``: mean silhouette coefficient (cosine distance), :func:`sklearn.metrics.silhouette_samples`.
- ``probe_acc``: accuracy of out-of-fold predictions of a logistic-regression probe,
  :class:`~sklearn.model_selection.StratifiedKFold` with ``n_splits = min(5, smallest class)``.

Ordinal / numeric labels (technique ``probe``):

- ``probe_r2``: R² of out-of-fold predictions of a ridge probe (:class:`~sklearn.linear_model.RidgeCV`
  choosing its penalty inside each training fold), ``KFold(min(5, n))``. Predictions are clipped
  to the range of the training fold's labels: an ordinal probe must not extrapolate, and on
  SmolLM2 one held-out atypical item (age 8, a single-digit token) was otherwise predicted
  at age 333 and alone turned a layer's R² from ~0.9 to -0.3.
- ``probe_spearman``: Spearman ρ between those out-of-fold predictions and the label.

Item filtering (cross-validation needs it): items whose label value is missing are dropped;
for categorical labels, classes with a single item are dropped (their items are not scored);
a label left with fewer than two classes (or, ordinal, fewer than two distinct values or four
items) is skipped.

Baseline (column ``baseline``): the same metric on randomly permuted labels — the mean over
``n_perm`` permutations (neighbour graph and distances reused), or ``n_perm_probe``
permutations for the probes (which must be refitted). CI (``ci_low``, ``ci_high``): 95 %
percentile bootstrap over items of the per-item quantities (neighbour agreement, silhouette,
correctness of the out-of-fold prediction; for R² and ρ the (label, prediction) pairs),
holding the neighbour graph and the fitted probes fixed; vectorised over resamples.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import pairwise_distances, silhouette_samples
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsRegressor, NearestNeighbors

from medmap.analysis.stats import bootstrap_indices

RIDGE_ALPHAS = np.logspace(-2, 4, 13)
ALPHA = 0.05


@dataclass
class Score:
    """One figure: estimate, 95 % CI, shuffled-label baseline, number of items."""

    metric: str
    value: float
    ci_low: float
    ci_high: float
    baseline: float
    n: int
    technique: str


def boot_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` resample indices (with replacement): :func:`medmap.analysis.stats.bootstrap_indices`."""
    return bootstrap_indices(rng, n, n_boot)


def percentile_ci(boots: np.ndarray) -> tuple[float, float]:
    """Central 95 % interval of bootstrap values (NaNs ignored; NaN if none finite)."""
    boots = np.asarray(boots, dtype=float)
    if not np.isfinite(boots).any():
        return float("nan"), float("nan")
    lo, hi = np.nanquantile(boots, [ALPHA / 2, 1 - ALPHA / 2])
    return float(lo), float(hi)


def mean_ci(per_item: np.ndarray, idx: np.ndarray) -> tuple[float, float, float]:
    """Mean of ``per_item`` with its bootstrap CI over the resamples ``idx``."""
    lo, hi = percentile_ci(per_item[idx].mean(axis=1))
    return float(per_item.mean()), lo, hi


def r2_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Row-wise R² of ``p`` for ``y`` (both ``(B, n)``); NaN for constant rows."""
    ss_res = ((y - p) ** 2).sum(-1)
    ss_tot = ((y - y.mean(-1, keepdims=True)) ** 2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.nan)


def spearman_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Row-wise Spearman ρ (Pearson of average ranks) of ``(B, n)`` arrays; NaN when constant."""
    ry = rankdata(y, axis=-1)
    rp = rankdata(p, axis=-1)
    ry = ry - ry.mean(-1, keepdims=True)
    rp = rp - rp.mean(-1, keepdims=True)
    den = np.sqrt((ry**2).sum(-1) * (rp**2).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (ry * rp).sum(-1) / den, np.nan)


def clean_categorical(values) -> tuple[np.ndarray, np.ndarray] | None:
    """Keep items with a label in a class of >= 2 items; ``None`` if < 2 classes remain.

    Returns ``(keep_mask, codes)`` with integer class codes of the kept items.
    """
    vals = np.array([None if v is None else str(v) for v in values], dtype=object)
    present = np.array([v is not None for v in vals])
    classes, counts = np.unique(vals[present].astype(str), return_counts=True)
    big = set(classes[counts >= 2])
    keep = np.array([v is not None and v in big for v in vals])
    if len(big) < 2:
        return None
    _, codes = np.unique(vals[keep].astype(str), return_inverse=True)
    return keep, codes


def clean_ordinal(values) -> tuple[np.ndarray, np.ndarray] | None:
    """Keep items with a finite numeric label; ``None`` if < 4 items or < 2 distinct values."""
    y = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    keep = np.isfinite(y)
    if keep.sum() < 4 or len(np.unique(y[keep])) < 2:
        return None
    return keep, y[keep]


def knn_indices(z: np.ndarray, k: int) -> np.ndarray:
    """Indices ``(n, k)`` of each row's ``k`` nearest other rows (cosine distance)."""
    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(z)
    _, ind = nn.kneighbors(z)
    # Drop the row itself (it may not be first when there are exact duplicates).
    out = np.empty((len(z), k), dtype=np.int64)
    for i in range(len(z)):
        row = ind[i][ind[i] != i]
        out[i] = row[:k]
    return out


def knn_agreement(codes: np.ndarray, nbrs: np.ndarray) -> np.ndarray:
    """Per-item fraction of neighbours with the same code; ``codes`` may be ``(P, n)``."""
    return (codes[..., nbrs] == codes[..., :, None]).mean(-1)


def permutations(codes: np.ndarray, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_perm, n)`` random permutations of ``codes``."""
    return np.stack([rng.permutation(codes) for _ in range(max(n_perm, 1))])


def _probe_classifier(seed: int) -> LogisticRegression:
    return LogisticRegression(C=1.0, solver="newton-cg", tol=1e-3, max_iter=100, random_state=seed)


def _cv_predict_class(z: np.ndarray, codes: np.ndarray, seed: int) -> np.ndarray:
    n_splits = int(min(5, np.bincount(codes).min()))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cross_val_predict(_probe_classifier(seed), z, codes, cv=cv)


class ClippedRegressor(RegressorMixin, BaseEstimator):
    """Wraps a regressor; predictions are clipped to the range of the labels it was fitted on."""

    def __init__(self, estimator=None):
        self.estimator = estimator

    def fit(self, x, y):
        self.estimator_ = clone(self.estimator).fit(x, y)
        self.range_ = (float(np.min(y)), float(np.max(y)))
        return self

    def predict(self, x):
        return np.clip(self.estimator_.predict(x), *self.range_)


def _cv_predict_reg(z: np.ndarray, y: np.ndarray, seed: int, estimator=None) -> np.ndarray:
    cv = KFold(n_splits=int(min(5, len(y))), shuffle=True, random_state=seed)
    est = estimator if estimator is not None else RidgeCV(alphas=RIDGE_ALPHAS)
    return cross_val_predict(ClippedRegressor(est), z, y, cv=cv)


def probe_point(z: np.ndarray, target: np.ndarray, categorical: bool, seed: int) -> float:
    """The probe's point value alone: out-of-fold accuracy (``categorical``, integer codes) or
    R² (ordinal/numeric ``target``) of the same probe, folds and seed as
    :func:`categorical_scores` / :func:`ordinal_scores`; NaN when ``z`` has non-finite rows."""
    if not np.isfinite(z).all():
        return float("nan")
    if categorical:
        return float((_cv_predict_class(z, target, seed) == target).mean())
    pred = _cv_predict_reg(z, target, seed)
    return float(r2_rows(target[None], pred[None])[0])


def categorical_scores(
    z: np.ndarray,
    codes: np.ndarray,
    *,
    rng: np.random.Generator,
    seed: int,
    n_boot: int = 200,
    n_perm: int = 20,
    n_perm_probe: int = 1,
    k: int = 10,
    probe: bool = True,
) -> tuple[list[Score], dict[str, np.ndarray]]:
    """``knn_purity``, ``silhouette`` and ``probe_acc`` for integer class ``codes`` of rows of ``z``.

    Also returns the per-item quantities (``knn_purity``, ``silhouette``) and the permuted-label
    baselines per item, keyed by metric, for paired comparisons between labels.
    """
    n = len(codes)
    k = int(min(k, n - 1))
    idx = boot_indices(n, n_boot, rng)
    perms = permutations(codes, n_perm, rng)
    nbrs = knn_indices(z, k)
    pur = knn_agreement(codes, nbrs)
    pur_perm = knn_agreement(perms, nbrs).mean(0)
    dist = pairwise_distances(z, metric="cosine")
    np.fill_diagonal(dist, 0.0)
    dist = np.clip(dist, 0.0, None)
    sil = silhouette_samples(dist, codes, metric="precomputed")
    sil_perm = np.mean(
        [silhouette_samples(dist, p, metric="precomputed") for p in perms[: max(1, n_perm // 4)]],
        axis=0,
    )
    out = [
        Score("knn_purity", *mean_ci(pur, idx), float(pur_perm.mean()), n, "cluster"),
        Score("silhouette", *mean_ci(sil, idx), float(sil_perm.mean()), n, "cluster"),
    ]
    if probe:
        correct = (_cv_predict_class(z, codes, seed) == codes).astype(float)
        base = np.mean([(_cv_predict_class(z, p, seed) == p).mean() for p in perms[:n_perm_probe]])
        out.append(Score("probe_acc", *mean_ci(correct, idx), float(base), n, "probe"))
    per_item = {
        "knn_purity": pur,
        "knn_purity_baseline": pur_perm,
        "silhouette": sil,
        "silhouette_baseline": sil_perm,
    }
    return out, per_item


def probe_accuracy_score(
    z: np.ndarray,
    codes: np.ndarray,
    *,
    rng: np.random.Generator,
    seed: int,
    n_boot: int = 200,
    n_perm_probe: int = 1,
    metric: str = "probe_acc",
) -> Score:
    """The ``probe_acc`` of :func:`categorical_scores` alone (same probe, folds and seed).

    ``z`` ``(n, k)`` features, ``codes`` ``(n,)`` integer classes (each class >= 2 items). Value:
    fraction of correct out-of-fold predictions; CI: bootstrap over items (``n_boot`` draws from
    ``rng``); baseline: mean accuracy over ``n_perm_probe`` permutations of ``codes``.
    """
    n = len(codes)
    idx = boot_indices(n, n_boot, rng)
    perms = permutations(codes, n_perm_probe, rng)
    correct = (_cv_predict_class(z, codes, seed) == codes).astype(float)
    base = np.mean([(_cv_predict_class(z, p, seed) == p).mean() for p in perms[:n_perm_probe]])
    return Score(metric, *mean_ci(correct, idx), float(base), n, "probe")


def ordinal_scores(
    z: np.ndarray,
    y: np.ndarray,
    *,
    rng: np.random.Generator,
    seed: int,
    n_boot: int = 200,
    n_perm_probe: int = 1,
) -> tuple[list[Score], np.ndarray]:
    """``probe_r2`` and ``probe_spearman`` of a cross-validated ridge probe; also its predictions."""
    n = len(y)
    idx = boot_indices(n, n_boot, rng)
    pred = _cv_predict_reg(z, y, seed)
    perms = np.stack([rng.permutation(y) for _ in range(max(n_perm_probe, 1))])
    perm_pred = np.stack([_cv_predict_reg(z, p, seed) for p in perms])
    r2 = float(r2_rows(y[None], pred[None])[0])
    rho = float(spearman_rows(y[None], pred[None])[0])
    r2_lo, r2_hi = percentile_ci(r2_rows(y[idx], pred[idx]))
    rho_lo, rho_hi = percentile_ci(spearman_rows(y[idx], pred[idx]))
    scores = [
        Score(
            "probe_r2", r2, r2_lo, r2_hi, float(np.nanmean(r2_rows(perms, perm_pred))), n, "probe"
        ),
        Score(
            "probe_spearman",
            rho,
            rho_lo,
            rho_hi,
            float(np.nanmean(spearman_rows(perms, perm_pred))),
            n,
            "probe",
        ),
    ]
    return scores, pred


def knn_regression_predictions(z: np.ndarray, y: np.ndarray, seed: int, k: int = 5) -> np.ndarray:
    """Out-of-fold predictions of a k-NN regressor (cosine distance, distance-weighted)."""
    k = int(max(1, min(k, len(y) - len(y) // min(5, len(y)) - 1)))
    est = KNeighborsRegressor(n_neighbors=k, metric="cosine", weights="distance", algorithm="brute")
    return _cv_predict_reg(z, y, seed, est)


def umap_embedding(
    z: np.ndarray,
    n_components: int,
    *,
    seed: int,
    metric: str = "cosine",
    n_neighbors: int = 15,
    n_epochs: int = 200,
) -> np.ndarray | None:
    """``umap.UMAP`` of ``z`` ``(n, k)`` to ``min(n_components, n - 2)`` dims (the paper scores
    silhouettes on a ~30-d UMAP); ``None`` below 10 items. Deterministic (fixed seed, one
    thread); distances precomputed with sklearn as in :mod:`.embed`."""
    import umap

    n = len(z)
    if n < 10:
        return None
    dims = int(min(n_components, n - 2))
    dmat = np.clip(pairwise_distances(z, metric=metric), 0.0, None)
    np.fill_diagonal(dmat, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(
            n_components=dims,
            n_neighbors=int(min(n_neighbors, n - 1)),
            metric="precomputed",
            n_epochs=n_epochs,
            random_state=seed,
            n_jobs=1,
            init="spectral",
        )
        return np.asarray(reducer.fit_transform(dmat), dtype=np.float64)
