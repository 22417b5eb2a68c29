"""2-D UMAP of every layer, kept consistent from layer to layer.

Each layer's item features (template-averaged, scaled, PCA <= 50 dims; see
:mod:`medmap.techniques.representation.features`) are embedded with :class:`umap.UMAP` (cosine metric by
default, fixed ``random_state``, ``n_neighbors = min(15, n - 1)``, 200 epochs). Consistency
across layers (``align``):

- ``"procrustes"`` (default): independent fits (deterministic spectral initialisation, same
  seed) each Procrustes-aligned to the previous layer's aligned embedding. Identical features at
  two layers give identical coordinates; the arbitrary rotations/reflections between fits are
  removed, so flipping through layers shows movement.
- ``"init"``: layer ``l`` starts from layer ``l-1``'s embedding (``init=`` array) and is then
  Procrustes-aligned to it. Measured on synthetic drifting data it was no smoother than
  ``"procrustes"`` (UMAP rescales the initial layout and re-optimises from a high learning
  rate), and identical layers move by ~8 % of the layout's extent. (:class:`umap.AlignedUMAP`
  was ~22 s for 31 layers of 120 items, too slow for the benchmark budget.)

Procrustes here is the orthogonal map (rotation or reflection) plus translation that best maps
the centred embedding onto the previous one (:func:`scipy.linalg.orthogonal_procrustes`); the
scale is left as UMAP made it. With fewer than 5 items, UMAP is replaced by PCA to 2-D (column
``method`` of the coordinates says which).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from scipy.linalg import orthogonal_procrustes
from sklearn.decomposition import PCA
from sklearn.manifold import trustworthiness
from sklearn.metrics import pairwise_distances

Align = Literal["init", "procrustes"]
MIN_UMAP_ITEMS = 5


def procrustes_align(emb: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Rotate/reflect and translate ``emb`` ``(n, 2)`` onto ``ref`` ``(n, 2)``."""
    mu_e, mu_r = emb.mean(0), ref.mean(0)
    r, _ = orthogonal_procrustes(emb - mu_e, ref - mu_r)
    return (emb - mu_e) @ r + mu_r


def _umap_fit(z: np.ndarray, init, seed: int, metric: str, n_neighbors: int, n_epochs: int):
    import umap

    n = len(z)
    # For small data UMAP computes all pairwise distances with its numba metric called pair by
    # pair from Python (~2-5 s per layer set of 250 items); sklearn's vectorised distances are
    # the same numbers, passed as a precomputed matrix.
    dmat = np.clip(pairwise_distances(z, metric=metric), 0.0, None)
    np.fill_diagonal(dmat, 0.0)
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=int(min(n_neighbors, n - 1)),
        metric="precomputed",
        n_epochs=n_epochs,
        init=init,
        random_state=seed,
        low_memory=True,
        n_jobs=1,
        min_dist=0.1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs overridden by random_state; spectral fallback
        return reducer.fit_transform(dmat)


def embed_layers(
    zs: Sequence[np.ndarray],
    *,
    seed: int = 0,
    metric: str = "cosine",
    n_neighbors: int = 15,
    n_epochs: int = 200,
    align: Align = "procrustes",
    on_layer: Callable[[int], None] | None = None,
) -> tuple[list[np.ndarray], list[float], str]:
    """Embed each layer's features ``zs[l]`` ``(n_items, k_l)`` in 2-D, aligned layer to layer.

    Returns ``(coords, trust, method)``: per layer ``(n_items, 2)`` float32 coordinates, the
    trustworthiness of each embedding (:func:`sklearn.manifold.trustworthiness`, cosine,
    ``n_neighbors = min(5, n // 2 - 1)``; NaN for tiny sets) and ``"umap"`` or ``"pca"``.
    """
    if align not in ("init", "procrustes"):
        raise ValueError(f"align must be 'init' or 'procrustes', not {align!r}")
    coords: list[np.ndarray] = []
    trust: list[float] = []
    prev = None
    n = len(zs[0]) if zs else 0
    method = "umap" if n >= MIN_UMAP_ITEMS else "pca"
    for layer_i, z in enumerate(zs):
        z = np.asarray(z, dtype=np.float64)
        if method == "pca":
            k = min(2, z.shape[1], max(n - 1, 1))
            emb = np.zeros((n, 2))
            if n > 1:
                emb[:, :k] = PCA(n_components=k, random_state=seed).fit_transform(z)
        else:
            init = prev if (align == "init" and prev is not None) else "spectral"
            emb = _umap_fit(z, init, seed, metric, n_neighbors, n_epochs)
        if prev is not None:
            emb = procrustes_align(emb, prev)
        prev = emb
        coords.append(emb.astype(np.float32))
        tk = min(5, n // 2 - 1)
        if tk >= 1 and np.isfinite(emb).all():
            trust.append(float(trustworthiness(z, emb, n_neighbors=tk, metric=metric)))
        else:
            trust.append(float("nan"))
        if on_layer is not None:
            on_layer(layer_i)
    return coords, trust, method
