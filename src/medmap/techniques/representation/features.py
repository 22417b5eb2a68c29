"""Per-item features of one layer: template averaging, centring/standardising, PCA.

Every score, detector and UMAP embedding of :mod:`medmap.techniques.representation` works in one space per
layer, built here:

1. **Template averaging.** A concept set renders each item into several prompts (templates).
   The activation of an item is the mean of its prompts' activations (``item_index`` maps rows
   to items), so a score reflects the concept, not one phrasing.
2. **Scaling** (pitfalls #4: raw residuals are extremely anisotropic, mean pairwise cosine
   ~0.999, one shared direction dominates). ``"standardize"`` (default) centres each feature on
   the item mean and divides by its standard deviation across items; ``"center"`` only centres;
   ``"none"`` keeps raw activations. The choice is recorded in the result table
   (column ``preprocess``).
3. **PCA** to ``min(n_components, n_items - 1, d_model)`` dimensions (default 50), fitted on
   the item-averaged activations (unsupervised, no labels, so no label leakage into the
   cross-validated probes).

The whole map is affine, so applying it to single prompts and then averaging per item gives the
item features exactly; that is what the template bootstrap of the detectors uses.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from medmap.analysis.stats import bootstrap_indices

Scaling = Literal["standardize", "center", "none"]


def item_matrix(item_index: np.ndarray, n_items: int) -> np.ndarray:
    """Row-stochastic averaging matrix ``A`` ``(n_items, n_prompts)``: ``A @ X`` = per-item mean."""
    item_index = np.asarray(item_index, dtype=np.int64)
    a = np.zeros((n_items, len(item_index)), dtype=np.float64)
    a[item_index, np.arange(len(item_index))] = 1.0
    counts = a.sum(1, keepdims=True)
    if (counts == 0).any():
        missing = np.flatnonzero(counts[:, 0] == 0)[:5].tolist()
        raise ValueError(f"items {missing} have no prompt rows")
    return a / counts


def average_templates(acts: np.ndarray, item_index: np.ndarray, n_items: int) -> np.ndarray:
    """Mean over each item's prompts: ``(n_prompts, ...)`` → ``(n_items, ...)`` (float32)."""
    a = item_matrix(item_index, n_items)
    flat = np.asarray(acts, dtype=np.float64).reshape(len(item_index), -1)
    return (a @ flat).reshape((n_items,) + acts.shape[1:]).astype(np.float32)


@dataclass
class LayerFeatures:
    """The analysis space of one layer.

    Attributes:
        raw: item-averaged raw activations ``(n_items, d_model)`` (for geometry metrics).
        z: item features after scaling and PCA ``(n_items, k)``.
        z_prompts: the same map applied to each prompt ``(n_prompts, k)``, or ``None`` when
            the input was already one row per item.
        item_index: prompt row → item ``(n_prompts,)`` or ``None``.
        template_index: prompt row → template ``(n_prompts,)`` or ``None``.
        explained_variance: fraction of the scaled variance the ``k`` components keep.
    """

    raw: np.ndarray
    z: np.ndarray
    z_prompts: np.ndarray | None
    item_index: np.ndarray | None
    explained_variance: float
    template_index: np.ndarray | None = None


def layer_features(
    x_items: np.ndarray,
    *,
    x_prompts: np.ndarray | None = None,
    item_index: np.ndarray | None = None,
    template_index: np.ndarray | None = None,
    scaling: Scaling = "standardize",
    n_components: int = 50,
    seed: int = 0,
) -> LayerFeatures:
    """Scale and PCA-reduce one layer's item activations ``(n_items, d_model)``.

    ``x_prompts`` ``(n_prompts, d_model)`` with ``item_index`` are transformed with the same
    (item-fitted) map. Constant features get unit scale (no division by zero).
    """
    x = np.asarray(x_items, dtype=np.float64)
    n, d = x.shape
    if scaling == "none":
        shift, scale = np.zeros(d), np.ones(d)
    elif scaling in ("center", "standardize"):
        sc = StandardScaler(with_std=scaling == "standardize").fit(x)
        shift = sc.mean_
        scale = sc.scale_ if scaling == "standardize" else np.ones(d)
    else:
        raise ValueError(f"scaling must be standardize, center or none, not {scaling!r}")
    xs = (x - shift) / scale
    k = max(1, min(n_components, n - 1, d))
    with warnings.catch_warnings():
        # constant layers (e.g. the same last token everywhere at layer 0) have zero variance
        warnings.simplefilter("ignore", RuntimeWarning)
        pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(xs)
    z = pca.transform(xs)
    zp = None
    if x_prompts is not None:
        zp = pca.transform((np.asarray(x_prompts, dtype=np.float64) - shift) / scale)
    total = float(pca.explained_variance_ratio_.sum()) if np.isfinite(xs).all() else float("nan")
    return LayerFeatures(
        raw=np.asarray(x_items, dtype=np.float32),
        z=z,
        z_prompts=zp,
        item_index=None if item_index is None else np.asarray(item_index, dtype=np.int64),
        explained_variance=total,
        template_index=None if template_index is None else np.asarray(template_index, np.int64),
    )


def template_bootstrap(
    feats: LayerFeatures, n_boot: int, rng: np.random.Generator
) -> np.ndarray | None:
    """Item features re-averaged over resampled templates: ``(n_boot, n_items, k)``.

    With ``template_index`` (templates shared across items, the usual case), one multiset of
    templates is drawn with replacement per resample and applied to *every* item (an item's
    prompts are weighted by how often their template was drawn; an item none of whose templates
    was drawn keeps its plain mean). Template-specific shifts common to all items then cancel in
    differences between items, as they do in the estimate. Without ``template_index``, each
    item's prompts are resampled independently. Returns ``None`` when no item has two or more
    prompts (a template bootstrap then carries no information).

    Indices come from :func:`medmap.analysis.stats.bootstrap_indices` (the one bootstrap
    helper): ``(n_boot, n_templates)`` template draws, or per item ``(n_boot, count)`` draws
    in item order, all from ``rng``.
    """
    if feats.z_prompts is None or feats.item_index is None:
        return None
    idx = feats.item_index
    n_items = feats.z.shape[0]
    counts = np.bincount(idx, minlength=n_items)
    if counts.max() < 2:
        return None
    order = np.argsort(idx, kind="stable")
    items_sorted = idx[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    zp = feats.z_prompts[order]
    out = np.zeros((n_boot, n_items, feats.z.shape[1]))
    if feats.template_index is not None:
        tpl = feats.template_index[order]
        uniq, tpl_code = np.unique(tpl, return_inverse=True)
        draws = bootstrap_indices(rng, len(uniq), n_boot)  # template multisets
        for b in range(n_boot):
            w = np.bincount(draws[b], minlength=len(uniq))[tpl_code].astype(float)
            den = np.add.reduceat(w, starts)
            none = den == 0
            if none.any():  # items without a drawn template: plain mean
                w = np.where(none[items_sorted], 1.0, w)
                den = np.add.reduceat(w, starts)
            out[b] = np.add.reduceat(zp * w[:, None], starts, axis=0) / den[:, None]
        return out
    # For every item (in item order), draw `count` rows among its own `count` rows (blocks stay
    # contiguous): one bootstrap_indices call per item, offset to the item's block.
    rows = np.concatenate(
        [starts[i] + bootstrap_indices(rng, int(c), n_boot) for i, c in enumerate(counts) if c],
        axis=1,
    )
    for b in range(n_boot):
        out[b] = np.add.reduceat(zp[rows[b]], starts, axis=0) / counts[:, None]
    return out
