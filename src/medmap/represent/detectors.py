"""Phenomenon detectors: one number per layer (or per model) with a bootstrap 95 % CI.

Formulas (also in ``docs/detectors.md``). ``z_i`` is item ``i``'s feature vector in the layer's
analysis space (template-averaged, scaled, PCA; see :mod:`medmap.represent.features`).

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
  by all items, features re-averaged; see :func:`medmap.represent.features.template_bootstrap`),
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

from dataclasses import dataclass

import numpy as np

from medmap.represent.scores import (
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
