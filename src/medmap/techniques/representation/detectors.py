"""Phenomenon detectors: one number per layer (or per model) with a bootstrap 95 % CI.

Formulas (also in ``docs/detectors.md``). ``z_i`` is item ``i``'s feature vector in the layer's
analysis space (template-averaged, scaled, PCA; see :mod:`medmap.techniques.representation.features`).

Age non-linearity and discontinuity (label ``age``):

- ``age_nonlinearity_gap = R²_kNN - R²_linear``: cross-validated R² of a k-NN regressor
  (k = 5, cosine, distance-weighted) minus that of the ridge probe, same folds. Positive when age
  is encoded non-linearly (e.g. piecewise). CI: paired bootstrap over items of the out-of-fold
  (label, prediction) pairs.
- ``age_jump_ratio``: items are grouped by age (features averaged within an age) and ordered,
  ``a_1 < ... < a_m``; ``step_j = ||z(a_{j+1}) - z(a_j)||``. Only steps whose two ages have the same
  number of concept tokens are considered (pitfalls #5: digit-count boundaries such as 9→10 and
  99→100 make fake jumps); ``ratio = max step / median step`` over the considered steps and
  ``age_jump_at = a_{j*+1}`` (the age reached by the largest step). ``*_uncontrolled`` use all
  steps. CI: bootstrap over templates (one template multiset drawn with replacement and shared
  by all items, features re-averaged; see :func:`medmap.techniques.representation.features.template_bootstrap`),
  or, with one prompt per item, over items (the distinct resampled items).

Progression (labels ``series``, ``stage``), per series with >= 3 stages:

- ``progression_monotonicity = |Spearman ρ(stage, t)|`` where ``t`` is the projection of the
  series' points on their first principal direction.
- ``progression_circularity = 1 - ||z_first - z_last|| / Σ_j ||z_{j+1} - z_j||`` along the stages
  in order: 0 for a straight path, → 1 when the path returns to its start.
  Reported per series (``label`` = series) and averaged over series (``label`` = ``mean``).
  CI: template bootstrap (per-series and mean); with one prompt per item the mean's CI is a
  bootstrap over series and the per-series CI is NaN.

Specialty vs mechanism (labels ``specialty``, ``mechanism``), on items valid for both:

- ``specialty_minus_mechanism_purity = mean_i (p_s(i) - p_m(i))`` with ``p(i)`` the k-NN label
  agreement of item ``i``; ``baseline`` = the same difference under shuffled labels (the chance
  difference: the labels have different numbers of classes).
- ``specialty_minus_mechanism_purity_excess`` = ``mean_i ((p_s - b_s) - (p_m - b_m))`` with ``b``
  the per-item shuffled-label agreement: chance-corrected difference.
- ``specialty_minus_mechanism_silhouette`` = mean per-item silhouette difference.
  CIs: paired bootstrap over items. "Drugs cluster by specialty rather than mechanism" at a layer
  = CI of the excess above 0.

Activation collapse (technique ``geometry``), on the item-averaged *raw* activations ``X``:

- ``effective_rank`` = participation ratio ``(Σλ)² / Σλ²`` of the eigenvalues ``λ`` of the
  covariance of the centred ``X`` (computed from the double-centred Gram matrix, whose non-zero
  eigenvalues are the same).
- ``anisotropy`` = mean cosine similarity over pairs of distinct items of the raw activations.
- ``mean_norm`` = mean L2 norm of the raw activations.
  CIs: bootstrap over items (for anisotropy, pairs of the same item are excluded).
- ``collapse_ratio = min_{l ∈ I} r_l / min(max_{l ∈ E} r_l, r_L)`` where ``r`` is the effective
  rank, ``E`` the early layers (relative depth <= ``early_depth``, default 0.25), ``L`` the
  last layer and ``I`` the layers strictly between ``E`` and ``L``; ``collapse_layer`` the
  argmin. ``collapse_recover = 1`` iff ``collapse_ratio < fraction`` (default 0.5), i.e. some
  intermediate layer's effective rank falls below ``fraction`` times both the early-layer
  maximum and the final layer's (the representation collapses, then recovers). Reported once per
  model (``layer = -1``); CI of the ratio over the item bootstrap, CI of the flag = flags of the
  ratio's CI ends.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from medmap.analysis.stats import profile_reliability, spearman_brown  # noqa: F401
from medmap.techniques.representation.scores import (
    Score,
    boot_indices,
    knn_agreement,
    knn_indices,
    mean_ci,
    percentile_ci,
    permutations,
    r2_rows,
    spearman_rows,
)

# ---------------------------------------------------------------- age


def age_nonlinearity_gap(
    y: np.ndarray, linear_pred: np.ndarray, knn_pred: np.ndarray, idx: np.ndarray
) -> Score:
    """``R²(kNN) - R²(linear)`` of out-of-fold predictions with a paired bootstrap CI (``idx``)."""
    gap = float(r2_rows(y[None], knn_pred[None])[0] - r2_rows(y[None], linear_pred[None])[0])
    boots = r2_rows(y[idx], knn_pred[idx]) - r2_rows(y[idx], linear_pred[idx])
    lo, hi = percentile_ci(boots)
    return Score("age_nonlinearity_gap", gap, lo, hi, float("nan"), len(y), "phenomenon")


@dataclass
class AgeGroups:
    """Items grouped by age: sorted distinct ages, averaging matrix ``(m, n)``, token counts."""

    ages: np.ndarray
    mean: np.ndarray
    token_counts: np.ndarray | None

    @classmethod
    def of(cls, ages: np.ndarray, token_counts: np.ndarray | None) -> AgeGroups:
        """Group items of equal age; a group's token count is its most common one."""
        uniq, inv = np.unique(ages, return_inverse=True)
        g = np.zeros((len(uniq), len(ages)))
        g[inv, np.arange(len(ages))] = 1.0
        tc = None
        if token_counts is not None:
            counts = np.asarray(token_counts, dtype=np.int64)
            tc = np.array([np.bincount(counts[inv == j]).argmax() for j in range(len(uniq))])
        return cls(uniq, g / g.sum(1, keepdims=True), tc)


def jump(
    ages: np.ndarray,
    z: np.ndarray,
    token_counts: np.ndarray | None,
    groups: AgeGroups | None = None,
) -> tuple[float, float, float]:
    """``(ratio, age_at, age_from)`` of the largest step between consecutive ages.

    With ``token_counts``, only steps between ages with equal token counts are considered.
    NaNs when fewer than 3 steps qualify or the median step is 0. ``groups`` (from
    :meth:`AgeGroups.of` with the same ages and counts) saves regrouping in bootstrap loops.
    """
    groups = groups if groups is not None else AgeGroups.of(ages, token_counts)
    a, tc = groups.ages, groups.token_counts
    steps = np.linalg.norm(np.diff(groups.mean @ z, axis=0), axis=1)
    ok = np.ones(len(steps), dtype=bool) if tc is None else tc[1:] == tc[:-1]
    if ok.sum() < 3:
        return float("nan"), float("nan"), float("nan")
    s = np.where(ok, steps, -np.inf)
    j = int(np.argmax(s))
    med = float(np.median(steps[ok]))
    if med <= 0:
        return float("nan"), float("nan"), float("nan")
    return float(steps[j] / med), float(a[j + 1]), float(a[j])


@dataclass
class JumpResult:
    """Age jump detector output: ratio and location, each with a CI."""

    ratio: Score
    at: Score
    frm: float


def age_jump(
    z: np.ndarray,
    ages: np.ndarray,
    *,
    token_counts: np.ndarray | None,
    boot_z: np.ndarray | None,
    rng: np.random.Generator,
    n_boot: int,
    suffix: str = "",
) -> JumpResult:
    """Jump ratio and age (see module doc); ``boot_z`` ``(B, n, k)`` from the template bootstrap."""
    groups = AgeGroups.of(ages, token_counts)
    ratio, at, frm = jump(ages, z, token_counts, groups)
    if boot_z is not None:
        boots = np.array([jump(ages, zb, token_counts, groups)[:2] for zb in boot_z])
    else:
        boots = []
        for row in boot_indices(len(ages), n_boot, rng):
            u = np.unique(row)
            tc = None if token_counts is None else np.asarray(token_counts)[u]
            boots.append(jump(ages[u], z[u], tc)[:2])
        boots = np.array(boots)
    r_lo, r_hi = percentile_ci(boots[:, 0])
    a_lo, a_hi = percentile_ci(boots[:, 1])
    n = len(ages)
    return JumpResult(
        Score(f"age_jump_ratio{suffix}", ratio, r_lo, r_hi, float("nan"), n, "phenomenon"),
        Score(f"age_jump_at{suffix}", at, a_lo, a_hi, float("nan"), n, "phenomenon"),
        frm,
    )


# ---------------------------------------------------------------- progression


def path_metrics(points: np.ndarray, stages: np.ndarray) -> tuple[float, float]:
    """``(monotonicity, circularity)`` of points ordered by ``stages`` (see module doc)."""
    order = np.argsort(stages, kind="stable")
    p = points[order]
    s = stages[order]
    centred = p - p.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    t = centred @ vt[0]
    mono = abs(float(spearman_rows(s[None], t[None])[0]))
    path = float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum())
    circ = float(1.0 - np.linalg.norm(p[-1] - p[0]) / path) if path > 0 else float("nan")
    return mono, circ


def progression(
    z: np.ndarray,
    series: np.ndarray,
    stages: np.ndarray,
    *,
    boot_z: np.ndarray | None,
    rng: np.random.Generator,
    n_boot: int,
) -> list[tuple[str, Score]]:
    """Per-series and mean monotonicity / circularity as ``(label, Score)`` pairs."""
    names = [s for s in dict.fromkeys(series) if (series == s).sum() >= 3]
    if not names:
        return []
    masks = [series == s for s in names]
    est = np.array([path_metrics(z[m], stages[m]) for m in masks])  # (S, 2)
    boots = None
    if boot_z is not None:
        boots = np.array([[path_metrics(zb[m], stages[m]) for m in masks] for zb in boot_z])
    out: list[tuple[str, Score]] = []
    metrics = ("progression_monotonicity", "progression_circularity")
    for j, metric in enumerate(metrics):
        for s_i, name in enumerate(names):
            lo, hi = percentile_ci(boots[:, s_i, j]) if boots is not None else (float("nan"),) * 2
            n = int(masks[s_i].sum())
            out.append(
                (str(name), Score(metric, est[s_i, j], lo, hi, float("nan"), n, "phenomenon"))
            )
        if boots is not None:
            lo, hi = percentile_ci(np.nanmean(boots[:, :, j], axis=1))
        elif len(names) >= 2:
            sidx = boot_indices(len(names), n_boot, rng)
            lo, hi = percentile_ci(np.nanmean(est[sidx, j], axis=1))
        else:
            lo = hi = float("nan")
        n = int(sum(m.sum() for m in masks))
        out.append(
            (
                "mean",
                Score(metric, float(np.nanmean(est[:, j])), lo, hi, float("nan"), n, "phenomenon"),
            )
        )
    return out


# ---------------------------------------------------------------- specialty vs mechanism


def label_contrast(
    z: np.ndarray,
    codes_a: np.ndarray,
    codes_b: np.ndarray,
    sil_a: np.ndarray,
    sil_b: np.ndarray,
    *,
    rng: np.random.Generator,
    n_boot: int,
    n_perm: int = 20,
    k: int = 10,
    prefix: str = "specialty_minus_mechanism",
) -> list[Score]:
    """Paired per-item k-NN purity and silhouette differences of two labels (module doc).

    ``codes_*`` are class codes of the same rows of ``z``; ``sil_*`` their per-item silhouettes.
    """
    n = len(codes_a)
    nbrs = knn_indices(z, int(min(k, n - 1)))
    pa, pb = knn_agreement(codes_a, nbrs), knn_agreement(codes_b, nbrs)
    ba = knn_agreement(permutations(codes_a, n_perm, rng), nbrs).mean(0)
    bb = knn_agreement(permutations(codes_b, n_perm, rng), nbrs).mean(0)
    idx = boot_indices(n, n_boot, rng)
    chance = float(ba.mean() - bb.mean())
    nan = float("nan")
    return [
        Score(f"{prefix}_purity", *mean_ci(pa - pb, idx), chance, n, "phenomenon"),
        Score(
            f"{prefix}_purity_excess", *mean_ci((pa - ba) - (pb - bb), idx), 0.0, n, "phenomenon"
        ),
        Score(f"{prefix}_silhouette", *mean_ci(sil_a - sil_b, idx), nan, n, "phenomenon"),
    ]


# ---------------------------------------------------------------- geometry / collapse


def _centred_gram_pr(g: np.ndarray) -> np.ndarray:
    """Participation ratio from (batched) Gram matrices ``(..., n, n)`` after double centring."""
    gc = g - g.mean(-1, keepdims=True) - g.mean(-2, keepdims=True) + g.mean((-1, -2), keepdims=True)
    tr = np.trace(gc, axis1=-2, axis2=-1)
    fro2 = (gc**2).sum((-1, -2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(fro2 > 0, tr**2 / fro2, np.nan)


def effective_rank(x: np.ndarray) -> float:
    """Participation ratio of the covariance eigenvalues of the centred rows of ``x`` ``(n, d)``."""
    x = np.asarray(x, dtype=np.float64)
    return float(_centred_gram_pr(x @ x.T))


def anisotropy(x: np.ndarray) -> float:
    """Mean cosine similarity over pairs of distinct rows of ``x`` (raw, not centred)."""
    x = np.asarray(x, dtype=np.float64)
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    c = u @ u.T
    n = len(x)
    return float((c.sum() - np.trace(c)) / (n * (n - 1)))


@dataclass
class GeometryLayer:
    """Geometry figures of one layer and the effective-rank bootstrap draws ``(B,)``."""

    scores: list[Score]
    rank_boots: np.ndarray


def geometry(x: np.ndarray, idx: np.ndarray, *, chunk: int = 25) -> GeometryLayer:
    """``effective_rank``, ``anisotropy``, ``mean_norm`` of raw item activations ``x`` ``(n, d)``.

    ``idx`` ``(B, n)`` are the item resamples (shared across layers so the collapse profile's
    bootstrap is coherent).
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    g = x @ x.T
    norms = np.sqrt(np.clip(np.diag(g), 0, None))
    u = g / np.maximum(np.outer(norms, norms), 1e-30)
    er_b, an_b = [], []
    for s in range(0, len(idx), chunk):
        ib = idx[s : s + chunk]
        er_b.append(_centred_gram_pr(g[ib[:, :, None], ib[:, None, :]]))
        cb = u[ib[:, :, None], ib[:, None, :]]
        distinct = ib[:, :, None] != ib[:, None, :]
        an_b.append((cb * distinct).sum((1, 2)) / np.maximum(distinct.sum((1, 2)), 1))
    er_b = np.concatenate(er_b)
    an_b = np.concatenate(an_b)
    nan = float("nan")
    er = effective_rank(x)
    scores = [
        Score("effective_rank", er, *percentile_ci(er_b), nan, n, "geometry"),
        Score("anisotropy", anisotropy(x), *percentile_ci(an_b), nan, n, "geometry"),
        Score("mean_norm", *mean_ci(norms, idx), nan, n, "geometry"),
    ]
    return GeometryLayer(scores, er_b)


def collapse_ratio(
    ranks: np.ndarray, layers: np.ndarray, n_layers: int, *, early_depth: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """``(ratio, layer_of_dip)`` of effective-rank profiles ``ranks`` ``(..., n_layers_kept)``.

    ``ratio = min_I r / min(max_E r, r_last)`` (module doc); NaN when there is no intermediate
    layer.
    """
    ranks = np.asarray(ranks, dtype=float)
    layers = np.asarray(layers)
    order = np.argsort(layers)
    ranks, layers = ranks[..., order], layers[order]
    early = layers / max(n_layers, 1) <= early_depth
    early[0] = True
    last_early = int(np.flatnonzero(early).max())
    inter = np.arange(last_early + 1, len(layers) - 1)
    if len(inter) == 0:
        nanv = np.full(ranks.shape[:-1], np.nan)
        return nanv, nanv
    dip = ranks[..., inter]
    # rows whose early or intermediate ranks are all NaN (degenerate tiny sets) give NaN
    ok = np.isfinite(dip).any(-1) & np.isfinite(ranks[..., : last_early + 1]).any(-1)
    filled = np.where(np.isfinite(ranks), ranks, -np.inf)
    e_max = np.where(ok, filled[..., : last_early + 1].max(-1), np.nan)
    ref = np.minimum(e_max, ranks[..., -1])
    j = np.where(np.isfinite(dip), dip, np.inf).argmin(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.take_along_axis(dip, j[..., None], -1)[..., 0] / ref
    where = layers[inter][j].astype(float)
    return np.where(ok, ratio, np.nan), np.where(ok, where, np.nan)


def collapse_recover(
    ranks: np.ndarray,
    rank_boots: np.ndarray,
    layers: np.ndarray,
    n_layers: int,
    *,
    n_items: int,
    fraction: float = 0.5,
    early_depth: float = 0.25,
) -> list[Score]:
    """``collapse_ratio``, ``collapse_layer`` and the ``collapse_recover`` flag (module doc).

    ``ranks`` ``(n_layers_kept,)``; ``rank_boots`` ``(B, n_layers_kept)`` bootstrap draws.
    """
    ratio, at = collapse_ratio(ranks, layers, n_layers, early_depth=early_depth)
    b_ratio, b_at = collapse_ratio(rank_boots, layers, n_layers, early_depth=early_depth)
    lo, hi = percentile_ci(b_ratio)
    at_lo, at_hi = percentile_ci(b_at)
    flag = float(ratio < fraction) if np.isfinite(ratio) else float("nan")
    flo = float(hi < fraction) if np.isfinite(hi) else float("nan")
    fhi = float(lo < fraction) if np.isfinite(lo) else float("nan")
    n = int(n_items)
    return [
        Score("collapse_ratio", float(ratio), lo, hi, float("nan"), n, "phenomenon"),
        Score("collapse_layer", float(at), at_lo, at_hi, float("nan"), n, "phenomenon"),
        Score("collapse_recover", flag, flo, fhi, float("nan"), n, "phenomenon"),
    ]


# ================================================================ nulls (issue 16)
#
# Every detector below is compared with a null computed in the same run, on the same analysis
# space (no recapture). A null row carries the null's mean in ``value`` and its central 95 %
# range in ``ci_low``/``ci_high``; a finding is claimed only when its CI lies beyond that range
# (analysis/findings.py). Everything is vectorised over the null draws.


def null_score(metric: str, draws: np.ndarray, n: int, technique: str = "phenomenon") -> Score:
    """A null row: mean of the ``draws`` and their central 95 % range (NaNs ignored)."""
    draws = np.asarray(draws, dtype=float)
    mean = float(np.nanmean(draws)) if np.isfinite(draws).any() else float("nan")
    lo, hi = percentile_ci(draws)
    return Score(metric, mean, lo, hi, float("nan"), n, technique)


def circularity_batch(p: np.ndarray) -> np.ndarray:
    """``1 - ||p_S - p_1|| / path length`` of paths ``p`` ``(..., S, k)`` (NaN for length 0)."""
    steps = np.linalg.norm(np.diff(p, axis=-2), axis=-1).sum(-1)
    chord = np.linalg.norm(p[..., -1, :] - p[..., 0, :], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(steps > 0, 1.0 - chord / steps, np.nan)


def tour_ratio_batch(p: np.ndarray, mean_pair: np.ndarray | float) -> np.ndarray:
    """Closed-tour ratio ``(Σ_j ||p_{j+1} - p_j|| + ||p_1 - p_S||) / (S · mean pair distance)``.

    ``p`` ``(..., S, k)``. Every edge of a randomly ordered closed tour is a uniformly random
    pair, so the ratio's expectation under random stage order is exactly 1; a smooth loop (or a
    smooth line, which goes out and back) is shorter. Circularity is the conjunction of a short
    closed tour (the stage order is encoded) and a returning path (``circularity`` > 0.5).
    """
    s = p.shape[-2]
    closed = np.concatenate([p, p[..., :1, :]], axis=-2)
    tour = np.linalg.norm(np.diff(closed, axis=-2), axis=-1).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(mean_pair) > 0, tour / (s * np.asarray(mean_pair)), np.nan)


def _mean_pair_distance(p: np.ndarray) -> np.ndarray:
    """Mean distance over pairs of distinct points of ``p`` ``(..., S, k)``."""
    d = np.linalg.norm(p[..., :, None, :] - p[..., None, :, :], axis=-1)
    s = p.shape[-2]
    return d.sum((-1, -2)) / (s * (s - 1))


def _stage_orders(s: int, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """Stage orders for the permutation null: all ``s!`` when that is <= ``n_perm``, else
    ``n_perm`` random ones. ``(n_orders, s)``."""
    import itertools
    import math

    if math.factorial(s) <= n_perm:
        return np.array(list(itertools.permutations(range(s))), dtype=np.int64)
    return np.argsort(rng.random((n_perm, s)), axis=1)


@dataclass
class ProgressionNull:
    """Permutation nulls of the progression detectors, per series and for the mean."""

    rows: list[tuple[str, Score]]


def _series_paths(z: np.ndarray, series: np.ndarray, stages: np.ndarray):
    names = [s for s in dict.fromkeys(series) if (series == s).sum() >= 3]
    paths = []
    for name in names:
        m = np.flatnonzero(series == name)
        order = m[np.argsort(stages[m], kind="stable")]
        paths.append(order)
    return names, paths


def progression_nulls(
    z: np.ndarray,
    series: np.ndarray,
    stages: np.ndarray,
    *,
    rng: np.random.Generator,
    n_perm: int = 200,
    boot_z: np.ndarray | None = None,
    prefix: str = "progression",
) -> list[tuple[str, Score]]:
    """Circularity's permutation null and the closed-tour test, as ``(label, Score)`` pairs.

    Rows (label = series name, and ``mean`` over series):

    - ``{prefix}_circularity_perm_null``: circularity of the same points in permuted stage
      order (every order when ``S! <= n_perm``, else ``n_perm`` random ones); for the mean, each
      draw permutes every series independently.
    - ``{prefix}_tour_ratio``: closed-tour ratio of the true order (:func:`tour_ratio_batch`),
      CI from the template bootstrap ``boot_z`` when given; ``..._tour_ratio_perm_null``: the
      same under permuted stage order.
    """
    names, paths = _series_paths(z, series, stages)
    if not names:
        return []
    out: list[tuple[str, Score]] = []
    circ_null, tour_null, tour_est, tour_boot = [], [], [], []
    for name, order in zip(names, paths):
        p = z[order]
        s = len(order)
        orders = _stage_orders(s, n_perm, rng)
        # the mean's null permutes every series independently in each of n_perm joint draws
        pick = orders if len(orders) == n_perm else orders[rng.integers(0, len(orders), n_perm)]
        mp = _mean_pair_distance(p)
        circ_null.append(circularity_batch(p[pick]))
        tour_null.append(tour_ratio_batch(p[pick], mp))
        tour_est.append(float(tour_ratio_batch(p, mp)))
        lo = hi = float("nan")
        if boot_z is not None:
            pb = boot_z[:, order]
            tour_boot.append(tour_ratio_batch(pb, _mean_pair_distance(pb)))
            lo, hi = percentile_ci(tour_boot[-1])
        label, n = str(name), int(s)
        # per series: every order when S! <= n_perm (an exact permutation null)
        out.append(
            (label, null_score(f"{prefix}_circularity_perm_null", circularity_batch(p[orders]), n))
        )
        out.append(
            (
                label,
                Score(f"{prefix}_tour_ratio", tour_est[-1], lo, hi, float("nan"), n, "phenomenon"),
            )
        )
        out.append(
            (
                label,
                null_score(f"{prefix}_tour_ratio_perm_null", tour_ratio_batch(p[orders], mp), n),
            )
        )
    n_all = int(sum(len(o) for o in paths))
    mean_circ_null = np.nanmean(np.stack(circ_null), axis=0)
    mean_tour_null = np.nanmean(np.stack(tour_null), axis=0)
    out.append(("mean", null_score(f"{prefix}_circularity_perm_null", mean_circ_null, n_all)))
    if boot_z is not None:
        lo, hi = percentile_ci(np.nanmean(np.stack(tour_boot), axis=0))
    else:
        lo = hi = float("nan")
    val = float(np.nanmean(tour_est))
    out.append(("mean", Score(f"{prefix}_tour_ratio", val, lo, hi, float("nan"), n_all,
                              "phenomenon")))  # fmt: skip
    out.append(("mean", null_score(f"{prefix}_tour_ratio_perm_null", mean_tour_null, n_all)))
    return out


def path_circularities(
    z: np.ndarray, series: np.ndarray, stages: np.ndarray, metric: str
) -> list[tuple[str, Score]]:
    """Circularity per series and mean (no CI) of points ``z``, e.g. 2-D UMAP coordinates."""
    names, paths = _series_paths(z, series, stages)
    if not names:
        return []
    nan = float("nan")
    vals = [float(circularity_batch(z[o])) for o in paths]
    out = [(str(nm), Score(metric, v, nan, nan, nan, len(o), "phenomenon"))
           for nm, v, o in zip(names, vals, paths)]  # fmt: skip
    n_all = int(sum(len(o) for o in paths))
    out.append(("mean", Score(metric, float(np.nanmean(vals)), nan, nan, nan, n_all,
                              "phenomenon")))  # fmt: skip
    return out


def template_halves(
    feats, n_splits: int, rng: np.random.Generator, *, splits: np.ndarray | None = None
) -> np.ndarray | None:
    """Item features averaged over two disjoint halves of the templates.

    Returns ``(n_splits, 2, n_items, k)`` (NaN rows for an item with no prompt in a half), or
    ``None`` without per-prompt features or with fewer than 2 templates. ``splits``
    ``(n_splits, n_templates)`` booleans (True = half A) fixes the splits, e.g. to share them
    across layers.
    """
    if feats.z_prompts is None or feats.item_index is None or feats.template_index is None:
        return None
    uniq, code = np.unique(feats.template_index, return_inverse=True)
    t = len(uniq)
    if t < 2:
        return None
    if splits is None:
        splits = half_splits(t, n_splits, rng)
    n_items = feats.z.shape[0]
    out = np.full((len(splits), 2, n_items, feats.z.shape[1]), np.nan)
    for s, a in enumerate(splits):
        for h, mask in enumerate((a[code], ~a[code])):
            w = np.zeros((n_items, len(code)))
            w[feats.item_index[mask], np.flatnonzero(mask)] = 1.0
            cnt = w.sum(1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[s, h] = (w @ feats.z_prompts) / cnt
    return out


def half_splits(n_templates: int, n_splits: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_splits, n_templates)`` random balanced splits of the templates (True = half A)."""
    out = np.zeros((max(n_splits, 1), n_templates), dtype=bool)
    for s in range(len(out)):
        out[s, rng.permutation(n_templates)[: n_templates // 2]] = True
    return out


def progression_noise_floor(
    halves: np.ndarray, series: np.ndarray, stages: np.ndarray, prefix: str = "progression"
) -> list[tuple[str, Score]]:
    """Circularity of the template-noise paths ``(z_A - z_B) / 2`` (the signal cancels).

    ``halves`` from :func:`template_halves` (rows of the progression items). Per series and
    mean; value = mean over splits, CI = the splits' central 95 % range.
    """
    noise = (halves[:, 0] - halves[:, 1]) / 2.0  # (n_splits, n, k)
    names, paths = _series_paths(noise[0], series, stages)
    if not names:
        return []
    per = np.stack([circularity_batch(noise[:, o]) for o in paths], axis=1)  # (splits, S)
    out = [(str(nm), null_score(f"{prefix}_circularity_noise_floor", per[:, i], len(o)))
           for i, (nm, o) in enumerate(zip(names, paths))]  # fmt: skip
    n_all = int(sum(len(o) for o in paths))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a split whose series are all NaN
        mean = np.nanmean(per, 1)
    out.append(("mean", null_score(f"{prefix}_circularity_noise_floor", mean, n_all)))
    return out


# ---------------------------------------------------------------- age: smooth null, a-priori step


def _gauss_smooth_segments(g: np.ndarray, seg: np.ndarray, sigma: float) -> np.ndarray:
    """Local-linear Gaussian kernel smoothing of rows of ``g`` ``(m, k)`` over their index.

    Rows are smoothed only with rows of the same segment ``seg`` ``(m,)`` (contiguous runs of
    equal token count: a digit-count boundary is a real change of input, not to be smeared).
    Local-linear rather than a kernel mean: a kernel mean is biased at segment ends on a
    trending curve, and those biased residuals, permuted into the middle, inflate the null.
    """
    m = len(g)
    i = np.arange(m, dtype=float)
    dt = i[None, :] - i[:, None]  # (target, source)
    w = np.exp(-0.5 * (dt / sigma) ** 2) * (seg[:, None] == seg[None, :])
    s0, s1, s2 = w.sum(1), (w * dt).sum(1), (w * dt**2).sum(1)
    den = s0 * s2 - s1**2
    lin = w * (s2[:, None] - dt * s1[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = np.where(den[:, None] > 1e-9 * s0[:, None] ** 2, lin / den[:, None], w / s0[:, None])
    return rows @ g


def _segments(tc: np.ndarray | None, m: int) -> np.ndarray:
    if tc is None:
        return np.zeros(m, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(tc[1:] != tc[:-1])])


def jump_ratio_batch(curves: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ratio, argmax step)`` of age curves ``(..., m, k)`` over the allowed steps ``ok``."""
    steps = np.linalg.norm(np.diff(curves, axis=-2), axis=-1)
    s = np.where(ok, steps, -np.inf)
    j = s.argmax(-1)
    med = np.median(steps[..., ok], axis=-1)
    mx = np.take_along_axis(steps, j[..., None], -1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(med > 0, mx / med, np.nan), j


def step_percentile_batch(curves: np.ndarray, ok: np.ndarray, j: int) -> np.ndarray:
    """Fraction of the allowed steps that are <= step ``j`` (``(..., m, k)`` curves)."""
    steps = np.linalg.norm(np.diff(curves, axis=-2), axis=-1)
    sj = steps[..., j : j + 1]
    return (steps[..., ok] <= sj).mean(-1)


def step_ratio_batch(curves: np.ndarray, ok: np.ndarray, j: int) -> np.ndarray:
    """Step ``j`` over the median allowed step (``(..., m, k)`` curves)."""
    steps = np.linalg.norm(np.diff(curves, axis=-2), axis=-1)
    med = np.median(steps[..., ok], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(med > 0, steps[..., j] / med, np.nan)


def age_nulls(
    z: np.ndarray,
    ages: np.ndarray,
    *,
    token_counts: np.ndarray | None,
    boot_z: np.ndarray | None,
    rng: np.random.Generator,
    n_null: int = 200,
    sigma: float = 3.0,
    a_priori: float = 18.0,
    prefix: str = "age",
) -> list[Score]:
    """Smooth null of the controlled jump ratio and the a-priori step test (module doc).

    - ``{prefix}_jump_ratio_smooth_null``: the controlled ``age_jump_ratio`` on resamples of a
      smoothed age curve plus its residuals: the per-age curve is smoothed (local-linear
      Gaussian kernel, ``sigma`` age steps, within runs of equal token count) and residuals are
      drawn with replacement within the run from the ages more than ``2 sigma`` away from the
      tested step (the largest one): is that step larger than the rest of the curve's roughness
      makes steps?
    - ``{prefix}_step_percentile``: the step crossing ``a_priori`` (from the largest age below
      it to the smallest at or above it, e.g. 17→18) as a percentile among all steps between
      ages of equal token count; CI from the template bootstrap; NaN when the two ages differ in
      token count. ``..._step_percentile_smooth_null``: the same on the smooth-null resamples
      (residuals from the ages away from this step).
    - ``{prefix}_step_ratio`` (and ``..._smooth_null``): that step over the median allowed step.
    """
    groups = AgeGroups.of(ages, token_counts)
    a, tc = groups.ages, groups.token_counts
    m = len(a)
    n = len(ages)
    ok = np.ones(m - 1, dtype=bool) if tc is None else tc[1:] == tc[:-1]
    if ok.sum() < 3:
        return []
    g = groups.mean @ z
    seg = _segments(tc, m)
    smooth = _gauss_smooth_segments(g, seg, sigma)
    resid = g - smooth
    w = int(np.ceil(2 * sigma))

    def null_curves_around(j: int) -> np.ndarray:
        # Residuals drawn (with replacement, within the token-count run) from the ages away
        # from step j: a real step at j leaves large smoothing residuals on both sides of it,
        # which, permuted, would make steps as large as itself and the null would grow with
        # the step (measured: no power at any step size). The curve keeps its smoothed ramp.
        draw = np.tile(np.arange(m), (n_null, 1))
        far = np.abs(np.arange(m) - j - 0.5) > w
        for sg in np.unique(seg):
            idx = np.flatnonzero(seg == sg)
            pool = idx[far[idx]] if far[idx].sum() >= 3 else idx
            draw[:, idx] = pool[rng.integers(0, len(pool), size=(n_null, len(idx)))]
        return smooth[None] + resid[draw]

    j_max = int(np.argmax(np.where(ok, np.linalg.norm(np.diff(g, axis=0), axis=1), -np.inf)))
    null_ratio, _ = jump_ratio_batch(null_curves_around(j_max), ok)
    out = [null_score(f"{prefix}_jump_ratio_smooth_null", null_ratio, n)]
    below = np.flatnonzero(a < a_priori)
    above = np.flatnonzero(a >= a_priori)
    nan = float("nan")
    if len(below) and len(above) and above[0] == below[-1] + 1:
        j = int(below[-1])
        if ok[j]:
            null_curves = null_curves_around(j)
            est = float(step_percentile_batch(g, ok, j))
            lo = hi = nan
            if boot_z is not None:
                lo, hi = percentile_ci(step_percentile_batch(boot_z_groups(boot_z, groups), ok, j))
            out.append(Score(f"{prefix}_step_percentile", est, lo, hi, nan, n, "phenomenon"))
            out.append(
                null_score(
                    f"{prefix}_step_percentile_smooth_null",
                    step_percentile_batch(null_curves, ok, j),
                    n,
                )
            )
            # the same step over the median allowed step: continuous, so it can clear its null
            # where a percentile of 1 cannot
            est_r = float(step_ratio_batch(g, ok, j))
            lo = hi = nan
            if boot_z is not None:
                lo, hi = percentile_ci(step_ratio_batch(boot_z_groups(boot_z, groups), ok, j))
            out.append(Score(f"{prefix}_step_ratio", est_r, lo, hi, nan, n, "phenomenon"))
            out.append(
                null_score(
                    f"{prefix}_step_ratio_smooth_null", step_ratio_batch(null_curves, ok, j), n
                )
            )
    return out


def boot_z_groups(boot_z: np.ndarray, groups: AgeGroups) -> np.ndarray:
    """Per-age means of bootstrap item features ``(B, n, k)`` → ``(B, m, k)``."""
    return np.einsum("mn,bnk->bmk", groups.mean, boot_z)


# ---------------------------------------------------------------- label contrasts: nulls


def silhouette_batch(dist: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Per-item silhouettes for many labelings at once: ``codes`` ``(P, n)`` → ``(P, n)``.

    Same definition as :func:`sklearn.metrics.silhouette_samples` with a precomputed distance
    matrix ``dist`` ``(n, n)`` (an item alone in its class scores 0).
    """
    codes = np.atleast_2d(codes)
    p, n = codes.shape
    c = int(codes.max()) + 1
    onehot = np.zeros((p, n, c))
    onehot[np.arange(p)[:, None], np.arange(n)[None, :], codes] = 1.0
    sums = np.einsum("ij,pjc->pic", dist, onehot)  # distance of item i to class c
    counts = onehot.sum(1)  # (P, C)
    own = np.take_along_axis(counts, codes, 1)  # (P, n)
    own_sum = np.take_along_axis(sums, codes[..., None], 2)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = own_sum / (own - 1)
        mean_other = sums / counts[:, None, :]
    mean_other = np.where(onehot > 0, np.inf, mean_other)
    mean_other = np.where(counts[:, None, :] > 0, mean_other, np.inf)
    b = mean_other.min(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (b - a) / np.maximum(a, b)
    return np.where(own > 1, np.nan_to_num(s), 0.0)


def contrast_nulls(
    z: np.ndarray,
    codes_a: np.ndarray,
    codes_b: np.ndarray,
    dist: np.ndarray,
    *,
    rng: np.random.Generator,
    n_perm: int = 200,
    n_base: int = 20,
    k: int = 10,
    prefix: str = "specialty_minus_mechanism",
    suffix: str = "",
) -> list[Score]:
    """Label-permutation nulls of the purity excess and the silhouette difference.

    Each draw shuffles the items' (label a, label b) pairs jointly against the space (the two
    labels keep their relation to each other, not to the geometry) and recomputes
    ``..._purity_excess`` (with its own chance baselines) and ``..._silhouette`` on ``dist``.
    """
    n = len(codes_a)
    perms = np.argsort(rng.random((n_perm, n)), axis=1)
    pa, pb = codes_a[perms], codes_b[perms]
    nbrs = knn_indices(z, int(min(k, n - 1)))
    base_a = knn_agreement(permutations(codes_a, n_base, rng), nbrs).mean(0).mean()
    base_b = knn_agreement(permutations(codes_b, n_base, rng), nbrs).mean(0).mean()
    excess = (knn_agreement(pa, nbrs).mean(1) - base_a) - (knn_agreement(pb, nbrs).mean(1) - base_b)
    sil = silhouette_batch(dist, pa).mean(1) - silhouette_batch(dist, pb).mean(1)
    out = [null_score(f"{prefix}_silhouette{suffix}_perm_null", sil, n)]
    if not suffix:
        out.insert(0, null_score(f"{prefix}_purity_excess_perm_null", excess, n))
    return out


def silhouette_perm_null(
    dist: np.ndarray, codes: np.ndarray, *, rng: np.random.Generator, n_perm: int = 200
) -> np.ndarray:
    """Mean silhouette under ``n_perm`` label permutations ``(n_perm,)``."""
    perms = np.argsort(rng.random((n_perm, len(codes))), axis=1)
    return silhouette_batch(dist, codes[perms]).mean(1)


# ---------------------------------------------------------------- age: local anisotropy


def local_anisotropy(z: np.ndarray, k: int = 20) -> np.ndarray:
    """Per item ``1 - λ2/λ1`` of the covariance of its ``k`` nearest neighbours (Euclidean,
    the item included). ``(n,)``; the paper's measure of a locally 1-D (thread-like) age code."""
    n = len(z)
    k = int(min(k, n))
    d = np.linalg.norm(z[:, None] - z[None], axis=-1)
    nb = np.argsort(d, axis=1, kind="stable")[:, :k]
    p = z[nb]
    p = p - p.mean(1, keepdims=True)
    sv = np.linalg.svd(p, compute_uv=False)  # (n, min(k, dim))
    lam = sv**2
    if lam.shape[1] < 2:
        return np.zeros(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(lam[:, 0] > 0, 1.0 - lam[:, 1] / lam[:, 0], np.nan)


# ---------------------------------------------------------------- stability


def progression_point(z: np.ndarray, series: np.ndarray, stages: np.ndarray) -> tuple[float, float]:
    """``(mean circularity, mean closed-tour ratio)`` over the series (no CI; stability)."""
    names, paths = _series_paths(z, series, stages)
    if not names:
        return float("nan"), float("nan")
    circ = [float(circularity_batch(z[o])) for o in paths]
    tour = [float(tour_ratio_batch(z[o], _mean_pair_distance(z[o]))) for o in paths]
    with np.errstate(invalid="ignore"):
        return float(np.nanmean(circ)), float(np.nanmean(tour))
