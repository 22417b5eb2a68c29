"""Representation maps (technique 1): scores, detectors and UMAP of every layer.

:func:`representation_map` captures a model's residual stream for a concept set and calls
:func:`analyse_activations`, which works on arrays only (so tests use synthetic activations):

1. per item, the activations of its prompts (templates) are averaged;
2. per layer, features are scaled (``standardize`` by default, see
   :mod:`medmap.techniques.representation.features`) and PCA-reduced to <= 50 dims;
3. per label: cluster and probe scores (:mod:`medmap.techniques.representation.scores`);
4. phenomenon detectors and geometry (:mod:`medmap.techniques.representation.detectors`);
5. a 2-D UMAP per layer, aligned across layers (:mod:`medmap.techniques.representation.embed`);
6. for concepts with a written amount ("15 g of x"), the surface baseline of the probes
   (:mod:`medmap.techniques.representation.surface_rows`).

Every figure is a row of the tidy results table (:mod:`medmap.analysis.results`), with the extra columns
``position`` (``concept``/``last``/...) and ``preprocess`` (e.g. ``standardize+pca50``); the
surface-baseline rows also fill ``feature`` (the surface feature read, or matched on).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Number
from typing import Any

import numpy as np
import pandas as pd

from medmap.analysis.results import make_rows, relative_depth
from medmap.errors import MedmapError
from medmap.progress import progress_bar
from medmap.techniques.representation import detectors as det
from medmap.techniques.representation import surface_rows as surf
from medmap.techniques.representation.embed import Align, embed_layers
from medmap.techniques.representation.features import (
    LayerFeatures,
    Scaling,
    item_matrix,
    layer_features,
    template_bootstrap,
)
from medmap.techniques.representation.scores import (
    Score,
    boot_indices,
    categorical_scores,
    clean_categorical,
    clean_ordinal,
    knn_regression_predictions,
    ordinal_scores,
    probe_point,
)

SCORED_KINDS = ("categorical", "ordinal", "numeric")


@dataclass
class RepresentationResult:
    """Output of :func:`representation_map`.

    Attributes:
        table: tidy results (:data:`medmap.analysis.results.COLUMNS` + ``position``, ``preprocess``).
        coords: UMAP coordinates, one row per (layer, item): ``layer``, ``relative_depth``,
            ``item_id``, ``concept``, ``x``, ``y``, ``method``, ``preprocess`` and one column
            per item label
            (a label named like a fixed column gets a ``label_`` prefix). Empty without UMAP.
    """

    table: pd.DataFrame
    coords: pd.DataFrame


@dataclass
class Label:
    """One item label: name, kind (categorical|ordinal|numeric|identifier|text), per-item values
    (``values`` as scored, ``raw`` as written), ``levels``: an ordinal label's declared order."""

    name: str
    kind: str
    values: list
    raw: list
    levels: list | None = None


@dataclass
class ItemInfo:
    """What the analysis needs to know about the items besides activations."""

    ids: list[str]
    concepts: list[str]
    labels: list[Label]
    set_name: str


def _is_number(v: Any) -> bool:
    return isinstance(v, Number) and not isinstance(v, bool)


def item_info(concepts_or_labels: Any, n_items: int, set_name: str | None = None) -> ItemInfo:
    """Normalise a :class:`~medmap.concepts.ConceptSet` or a label mapping.

    A mapping is ``{name: values}`` (kind inferred: all numbers → ordinal, else categorical) or
    ``{name: (kind, values)}``; each ``values`` has one entry per item.
    """
    if hasattr(concepts_or_labels, "items") and hasattr(concepts_or_labels, "label_values"):
        cs = concepts_or_labels
        labels = []
        for name, spec in cs.labels.items():
            raw = [it.labels.get(name) for it in cs.items]
            values = list(cs.label_values(name))
            labels.append(Label(name, str(spec.kind), values, raw, spec.order))
        ids = [str(it.id) for it in cs.items]
        texts = [str(it.concept) for it in cs.items]
        name = set_name or str(cs.name)
    elif isinstance(concepts_or_labels, Mapping):
        labels = []
        for lname, v in concepts_or_labels.items():
            if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
                kind, values = v[0], list(v[1])
            else:
                values = list(v)
                kind = "ordinal" if all(_is_number(x) for x in values) else "categorical"
            labels.append(Label(str(lname), kind, values, values))
        ids = [str(i) for i in range(n_items)]
        texts = ids
        name = set_name or "custom"
    else:
        raise TypeError("concepts_or_labels must be a ConceptSet or a mapping of label values")
    for lab in labels:
        if len(lab.values) != n_items:
            raise MedmapError(
                f"label {lab.name!r} has {len(lab.values)} values for {n_items} items",
                hint="one label value per item, in item order",
            )
    if len(ids) != n_items:
        raise MedmapError(f"{len(ids)} items in the concept set but activations for {n_items}")
    return ItemInfo(ids, texts, labels, name)


def _note(text: str) -> None:
    """A one-line note on stderr (as :meth:`medmap.techniques.base.RunContext.note`)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[yellow]{escape(text)}[/]")


def _rng(seed: int, layer: int, tag: str) -> np.random.Generator:
    """Independent deterministic stream per (seed, layer, tag)."""
    return np.random.default_rng([int(seed), int(layer) + 1, zlib.crc32(tag.encode())])


def _row(score: Score, layer: int, label: str, ctx: dict) -> dict:
    n_layers = ctx["n_layers"]
    return {
        "model": ctx["model"],
        "layer": layer,
        "relative_depth": relative_depth(layer, n_layers),
        "concept_set": ctx["concept_set"],
        "technique": score.technique,
        "metric": score.metric,
        "label": label,
        "value": score.value,
        "ci_low": score.ci_low,
        "ci_high": score.ci_high,
        "baseline": score.baseline,
        "n": score.n,
        "seed": ctx["seed"],
        "position": ctx["position"],
        "preprocess": ctx["preprocess"],
    }


def analyse_activations(
    acts: np.ndarray,
    concepts_or_labels: Any,
    *,
    item_index: Sequence[int] | np.ndarray | None = None,
    template_index: Sequence[int] | np.ndarray | None = None,
    layers: Sequence[int] | None = None,
    model_name: str = "model",
    n_layers: int | None = None,
    concept_set: str | None = None,
    position: str = "concept",
    token_counts: Sequence[int] | np.ndarray | None = None,
    seed: int = 0,
    n_boot: int = 200,
    n_perm: int = 20,
    n_perm_probe: int = 1,
    k: int = 10,
    scaling: Scaling = "standardize",
    n_components: int = 50,
    umap: bool = True,
    umap_metric: str = "cosine",
    umap_neighbors: int = 15,
    umap_epochs: int = 200,
    align: Align = "procrustes",
    age_label: str = "age",
    contrast: tuple[str, str] = ("specialty", "mechanism"),
    collapse_fraction: float = 0.5,
    early_depth: float = 0.25,
    n_null: int = 200,
    umap30: bool = True,
    tokenizer: Any = None,
    n_perm_surface: int = 200,
    progress: bool = False,
) -> RepresentationResult:
    """Scores, detectors and (optionally) UMAP coordinates of activations.

    Args:
        acts: ``(n_items, n_layers_kept, d_model)``, or ``(n_prompts, n_layers_kept, d_model)``
            with ``item_index`` (prompt row → item), in which case prompts are averaged per item
            and detectors use a template bootstrap for their CIs.
        template_index: prompt row → template (with ``item_index``); makes the template
            bootstrap draw one template multiset shared by all items.
        concepts_or_labels: a ConceptSet or ``{label: values}`` (see :func:`item_info`).
        layers: residual-stream index of each slice of axis 1 (default ``0..n_layers_kept-1``).
        n_layers: the model's number of blocks, for ``relative_depth`` (default ``max(layers)``).
        token_counts: per-item number of concept tokens; enables the controlled age-jump detector.
        n_boot: bootstrap resamples for every CI. ``n_perm``/``n_perm_probe``: label
            permutations for the cluster/probe baselines.
        scaling, n_components: the analysis space (see :mod:`medmap.techniques.representation.features`).
        umap: compute the per-layer UMAP (and ``trustworthiness`` rows).
        age_label: ordinal label that triggers the age detectors. ``contrast``: two categorical
            labels compared by the purity/silhouette-difference detector.
        collapse_fraction, early_depth: parameters of ``collapse_recover``.
        n_null: draws of every detector null (stage-order and label permutations, smooth
            age-curve resamples; docs/detectors.md "Nulls").
        umap30: with ``umap``, also a 30-dimensional UMAP per layer for the paper's silhouettes
            (``silhouette_umap30`` per categorical label, with a label-permutation null).
        tokenizer: the model's tokenizer, for the ``tokens`` surface feature of concepts with a
            written amount (without it the surface baseline uses digits and characters only).
        n_perm_surface: label permutations of the surface baseline's null (layer -1
            ``surface_probe_acc``; docs/detectors.md "Surface baseline").

    Returns:
        :class:`RepresentationResult`.

    BLAS runs single-threaded here: the matrices are small (items × <= 50 dims), and a
    multi-threaded OpenBLAS was measured 10-60x slower on them on a busy 2-core machine.
    """
    params = dict(locals())
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _analyse(**params)


def _analyse(
    acts,
    concepts_or_labels,
    *,
    item_index,
    template_index,
    layers,
    model_name,
    n_layers,
    concept_set,
    position,
    token_counts,
    seed,
    n_boot,
    n_perm,
    n_perm_probe,
    k,
    scaling,
    n_components,
    umap,
    umap_metric,
    umap_neighbors,
    umap_epochs,
    align,
    age_label,
    contrast,
    collapse_fraction,
    early_depth,
    n_null,
    umap30,
    tokenizer,
    n_perm_surface,
    progress,
) -> RepresentationResult:
    acts = np.asarray(acts)
    if acts.ndim != 3:
        raise MedmapError(f"activations must be 3-D (items, layers, d_model), got {acts.shape}")
    n_rows, n_kept, _ = acts.shape
    layer_ids = list(range(n_kept)) if layers is None else [int(x) for x in layers]
    if len(layer_ids) != n_kept:
        raise MedmapError(f"{len(layer_ids)} layer indices for {n_kept} activation layers")
    n_layers = int(n_layers if n_layers is not None else max(max(layer_ids), 1))
    if item_index is not None:
        item_index = np.asarray(item_index, dtype=np.int64)
        if len(item_index) != n_rows:
            raise MedmapError(f"item_index has {len(item_index)} entries for {n_rows} prompts")
        n_items = int(item_index.max()) + 1
        if template_index is not None:
            template_index = np.asarray(template_index, dtype=np.int64)
            if len(template_index) != n_rows:
                raise MedmapError(
                    f"template_index has {len(template_index)} entries for {n_rows} prompts"
                )
    else:
        n_items = n_rows
    if hasattr(concepts_or_labels, "items") and hasattr(concepts_or_labels, "label_values"):
        n_items = max(n_items, len(concepts_or_labels.items))
    info = item_info(concepts_or_labels, n_items, concept_set)
    if n_items < 3:
        raise MedmapError(f"need at least 3 items for representation scores, got {n_items}")
    tc = None if token_counts is None else np.asarray(token_counts, dtype=np.int64)
    if tc is not None and len(tc) != n_items:
        raise MedmapError(f"token_counts has {len(tc)} entries for {n_items} items")

    k_dims = max(1, min(n_components, n_items - 1, acts.shape[2]))
    ctx = {
        "model": model_name,
        "n_layers": n_layers,
        "concept_set": info.set_name,
        "seed": seed,
        "position": position,
        "preprocess": f"{scaling}+pca{k_dims}",
    }
    by_name = {lab.name: lab for lab in info.labels}
    age = by_name.get(age_label)
    if age is None and age_label == "age":
        age = by_name.get("year")  # the years control set runs the age detectors as their control
    age_ok = age is not None and age.kind in ("ordinal", "numeric")
    has_prog = "series" in by_name and "stage" in by_name
    con_a, con_b = (by_name.get(c) for c in contrast)
    has_contrast = (
        con_a is not None
        and con_b is not None
        and con_a.kind == "categorical"
        and con_b.kind == "categorical"
    )
    geo_idx = boot_indices(n_items, n_boot, _rng(seed, -1, "geometry"))
    avg = None
    if item_index is not None:
        try:
            avg = item_matrix(item_index, n_items)  # per-item mean over its prompts
        except ValueError as e:
            raise MedmapError(f"activations do not cover every item: {e}") from None

    rows: list[dict] = []
    zs: list[np.ndarray] = []
    rank_profile, rank_boots = [], []
    # one split of the templates into disjoint halves, shared by every layer (stability)
    splits = None
    if template_index is not None and len(np.unique(template_index)) >= 2:
        splits = det.half_splits(
            len(np.unique(template_index)), N_SPLITS, _rng(seed, -1, "template_halves")
        )
    halves_profile: dict[tuple[str, str], list[np.ndarray]] = {}
    surface, plans, skipped = surf.plan_surface(
        info, tokenizer=tokenizer, seed=seed, n_perm=n_perm_surface
    )
    for name, sc, feature in surface:
        rows.append(_row(sc, -1, name, ctx) | {"feature": feature})
    if skipped:
        _note(
            f"{info.set_name}: no surface-matched probe for {', '.join(skipped)} (no subset "
            f"balanced on the digit, character or token counts has "
            f"{surf.MIN_MATCHED_PER_LABEL} items of every level)"
        )
    setup = _LayerSetup(
        info=info,
        ctx=ctx,
        tc=tc,
        seed=seed,
        n_boot=n_boot,
        n_perm=n_perm,
        n_perm_probe=n_perm_probe,
        n_null=n_null,
        k=k,
        age=age if age_ok else None,
        has_prog=has_prog,
        contrast=(con_a, con_b) if has_contrast else None,
        splits=splits,
    )
    with progress_bar(f"scores {info.set_name}", total=n_kept, enabled=progress) as advance:
        for j, layer in enumerate(layer_ids):
            x = np.asarray(acts[:, j, :], dtype=np.float32)
            if avg is not None:
                x_items = avg @ x.astype(np.float64)
                feats = layer_features(
                    x_items,
                    x_prompts=x,
                    item_index=item_index,
                    template_index=template_index,
                    scaling=scaling,
                    n_components=n_components,
                    seed=seed,
                )
            else:
                feats = layer_features(x, scaling=scaling, n_components=n_components, seed=seed)
            zs.append(feats.z)
            rows += _layer_rows(feats, layer, setup)
            rows += _null_rows(feats, layer, setup, halves_profile)
            for plan in plans:
                rng = _rng(seed, layer, f"{plan.label.name}:surface_matched")
                for sc in surf.matched_scores(
                    feats.z, plan, rng=rng, seed=seed, n_boot=n_boot, n_perm_probe=n_perm_probe
                ):
                    rows.append(_row(sc, layer, plan.label.name, ctx) | {"feature": plan.feature})
            geo = det.geometry(feats.raw, geo_idx)
            rows += [_row(s, layer, "", ctx) for s in geo.scores]
            rank_profile.append(geo.scores[0].value)
            rank_boots.append(geo.rank_boots)
            advance(1)

    collapse = det.collapse_recover(
        np.array(rank_profile),
        np.stack(rank_boots, axis=1),
        np.array(layer_ids),
        n_layers,
        n_items=n_items,
        fraction=collapse_fraction,
        early_depth=early_depth,
    )
    rows += [_row(s, -1, "", ctx) for s in collapse]
    rows += _stability_rows(halves_profile, ctx, n_items)

    coords = pd.DataFrame()
    if umap:
        with progress_bar(f"umap {info.set_name}", total=n_kept, enabled=progress) as advance:
            emb, trust, method = embed_layers(
                zs,
                seed=seed,
                metric=umap_metric,
                n_neighbors=umap_neighbors,
                n_epochs=umap_epochs,
                align=align,
                on_layer=lambda _i: advance(1),
            )
        for layer, t in zip(layer_ids, trust):
            s = Score("trustworthiness", t, np.nan, np.nan, np.nan, n_items, "umap")
            rows.append(_row(s, layer, "", ctx))
        coords = _coords_frame(emb, layer_ids, n_layers, info, method)
        coords.insert(7, "preprocess", ctx["preprocess"])
        if has_prog:
            for layer, e in zip(layer_ids, emb):
                rows += _umap_progression_rows(e, info, layer, ctx, seed=seed, n_null=n_null)
        if umap30:
            rows += _umap30_rows(
                zs,
                layer_ids,
                info,
                ctx,
                seed=seed,
                n_boot=n_boot,
                n_null=n_null,
                metric=umap_metric,
                n_neighbors=umap_neighbors,
                n_epochs=umap_epochs,
                contrast=(con_a, con_b) if has_contrast else None,
            )
    table = make_rows(rows)
    return RepresentationResult(table=table, coords=coords)


@dataclass(frozen=True, eq=False)
class _LayerSetup:
    """What the rows of every layer share (:func:`_layer_rows`, :func:`_null_rows`): the items,
    the row context of :func:`_row`, the resampling sizes and the detectors that apply.

    Attributes:
        tc: per-item concept token counts ``(n_items,)`` or ``None``.
        n_boot / n_perm / n_perm_probe / n_null / k: bootstrap resamples, label permutations
            (cluster / probe baselines), draws of every detector null, k-NN neighbours.
        age: the ordinal label of the age detectors, or ``None``.
        has_prog: whether the progression detectors apply (``series`` and ``stage`` labels).
        contrast: the two categorical labels compared, or ``None``.
        splits: template half-splits ``(n_splits, n_templates)`` shared by every layer, or
            ``None`` (fewer than two templates).
    """

    info: ItemInfo
    ctx: dict
    tc: np.ndarray | None
    seed: int
    n_boot: int
    n_perm: int
    n_perm_probe: int
    n_null: int
    k: int
    age: Label | None
    has_prog: bool
    contrast: tuple[Label, Label] | None
    splits: np.ndarray | None


def _scored_labels(info: ItemInfo):
    """``(label, keep, target)`` of every label a probe scores: categorical labels with their
    integer codes, ordinal/numeric ones with their values, on the items that have one."""
    for lab in info.labels:
        if lab.kind not in SCORED_KINDS:
            continue
        clean = clean_categorical if lab.kind == "categorical" else clean_ordinal
        cleaned = clean(lab.values)
        if cleaned is not None:
            yield lab, *cleaned


def _layer_rows(feats: LayerFeatures, layer: int, setup: _LayerSetup) -> list[dict]:
    """Cluster/probe scores of every label plus the detectors of one layer."""
    info, ctx, tc, seed, n_boot = setup.info, setup.ctx, setup.tc, setup.seed, setup.n_boot
    n_perm, n_perm_probe, k = setup.n_perm, setup.n_perm_probe, setup.k
    age, has_prog, contrast = setup.age, setup.has_prog, setup.contrast
    rows: list[dict] = []
    z = feats.z
    sil_by_label: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    boot_z = None
    if age is not None or has_prog:
        boot_z = template_bootstrap(feats, n_boot, _rng(seed, layer, "templates"))
    for lab, keep, target in _scored_labels(info):
        rng = _rng(seed, layer, lab.name)
        if lab.kind == "categorical":
            codes = target
            scores, per_item = categorical_scores(
                z[keep],
                codes,
                rng=rng,
                seed=seed,
                n_boot=n_boot,
                n_perm=n_perm,
                n_perm_probe=n_perm_probe,
                k=k,
            )
            full = np.full(len(keep), np.nan)
            full[keep] = per_item["silhouette"]
            sil_by_label[lab.name] = (keep, full)
            rows += [_row(s, layer, lab.name, ctx) for s in scores]
            continue
        y = target
        scores, lin_pred = ordinal_scores(
            z[keep], y, rng=rng, seed=seed, n_boot=n_boot, n_perm_probe=n_perm_probe
        )
        rows += [_row(s, layer, lab.name, ctx) for s in scores]
        if age is not None and lab.name == age.name:
            rows += _age_rows(
                z, keep, y, lin_pred, tc, boot_z, layer, lab.name, ctx, seed=seed, n_boot=n_boot
            )
    if has_prog:
        rows += _progression_rows(z, info, boot_z, layer, ctx, seed=seed, n_boot=n_boot)
    if contrast is not None:
        rows += _contrast_rows(
            z, contrast, layer, ctx, seed=seed, n_boot=n_boot, n_perm=n_perm, k=k
        )
    return rows


def _age_rows(z, keep, y, lin_pred, tc, boot_z, layer, name, ctx, *, seed, n_boot) -> list[dict]:
    rng = _rng(seed, layer, "age")
    knn_pred = knn_regression_predictions(z[keep], y, seed)
    idx = boot_indices(len(y), n_boot, rng)
    rows = [_row(det.age_nonlinearity_gap(y, lin_pred, knn_pred, idx), layer, name, ctx)]
    bz = None if boot_z is None else boot_z[:, keep]
    variants = [("_uncontrolled", None)]
    if tc is not None:
        variants.insert(0, ("", tc[keep]))
    for suffix, counts in variants:
        res = det.age_jump(
            z[keep], y, token_counts=counts, boot_z=bz, rng=rng, n_boot=n_boot, suffix=suffix
        )
        for s in (res.ratio, res.at):
            row = _row(s, layer, name, ctx)
            row["age_from"] = res.frm
            rows.append(row)
    return rows


def _progression_rows(z, info, boot_z, layer, ctx, *, seed, n_boot) -> list[dict]:
    series, stage, ok = _prog_arrays(info)
    bz = None if boot_z is None else boot_z[:, ok]
    pairs = det.progression(
        z[ok], series[ok], stage[ok], boot_z=bz, rng=_rng(seed, layer, "progression"), n_boot=n_boot
    )
    return [_row(s, layer, label, ctx) for label, s in pairs]


def _contrast_rows(z, contrast, layer, ctx, *, seed, n_boot, n_perm, k) -> list[dict]:
    from sklearn.metrics import pairwise_distances, silhouette_samples

    a, b = contrast
    cc = _contrast_codes(a, b)
    if cc is None:
        return []
    keep, codes_a, codes_b = cc
    zk = z[keep]
    dist = np.clip(pairwise_distances(zk, metric="cosine"), 0.0, None)
    np.fill_diagonal(dist, 0.0)
    sil_a = silhouette_samples(dist, codes_a, metric="precomputed")
    sil_b = silhouette_samples(dist, codes_b, metric="precomputed")
    scores = det.label_contrast(
        zk,
        codes_a,
        codes_b,
        sil_a,
        sil_b,
        rng=_rng(seed, layer, "contrast"),
        n_boot=n_boot,
        n_perm=n_perm,
        k=k,
        prefix=f"{a.name}_minus_{b.name}",
    )
    return [_row(s, layer, f"{a.name}-{b.name}", ctx) for s in scores]


N_SPLITS = 10  # random splits of the templates into disjoint halves (stability, noise floor)


def _prog_arrays(info: ItemInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    by_name = {lab.name: lab for lab in info.labels}
    series = np.array([None if v is None else str(v) for v in by_name["series"].values], object)
    stage = np.array(
        [np.nan if v is None else float(v) for v in by_name["stage"].values], dtype=float
    )
    ok = np.array([s is not None for s in series]) & np.isfinite(stage)
    return series, stage, ok


def _contrast_codes(a: Label, b: Label):
    """Items valid for both labels and their codes (a class may shrink to one item here and
    then scores 0), or ``None`` with fewer than 4 items or a single class."""
    ca, cb = clean_categorical(a.values), clean_categorical(b.values)
    if ca is None or cb is None:
        return None
    keep = ca[0] & cb[0]
    codes_a = np.unique(np.array(a.values, dtype=object)[keep].astype(str), return_inverse=True)[1]
    codes_b = np.unique(np.array(b.values, dtype=object)[keep].astype(str), return_inverse=True)[1]
    if keep.sum() < 4 or codes_a.max() < 1 or codes_b.max() < 1:
        return None
    return keep, codes_a, codes_b


def _null_rows(
    feats: LayerFeatures, layer: int, setup: _LayerSetup, halves_profile: dict
) -> list[dict]:
    """Nulls of the detectors of one layer (new rows; the detectors' own rows are unchanged).

    Also records each detector on the two template halves of every split in
    ``halves_profile[(metric, label)]`` (one ``(n_splits, 2)`` array per layer) for
    :func:`_stability_rows`.
    """
    info, ctx, tc, seed, n_boot = setup.info, setup.ctx, setup.tc, setup.seed, setup.n_boot
    n_null, k, splits = setup.n_null, setup.k, setup.splits
    age, has_prog, contrast = setup.age, setup.has_prog, setup.contrast
    from sklearn.metrics import pairwise_distances

    from medmap.techniques.representation.scores import knn_agreement, knn_indices, mean_ci

    rows: list[dict] = []
    z = feats.z
    halves = (
        None if splits is None else det.template_halves(feats, len(splits), None, splits=splits)
    )
    boot_z = None
    if age is not None or has_prog:  # the same draws as the detectors' own CIs
        boot_z = template_bootstrap(feats, n_boot, _rng(seed, layer, "templates"))

    def stab(metric: str, label: str, fn) -> None:
        if halves is None:
            return
        memo: dict[bytes, float] = {}  # few templates repeat splits: each half is scored once

        def score(s: int, h: int) -> float:
            key = (splits[s] if h == 0 else ~splits[s]).tobytes()
            if key not in memo:
                memo[key] = fn(halves[s, h])
            return memo[key]

        vals = np.array([[score(s, h) for h in (0, 1)] for s in range(len(halves))])
        halves_profile.setdefault((metric, label), []).append(vals)

    # the representation map row's own stability: the probe profile on each template half
    for lab, keep_l, target in _scored_labels(info):
        cat = lab.kind == "categorical"
        stab(
            "probe_acc" if cat else "probe_r2",
            lab.name,
            lambda h, keep_l=keep_l, target=target, cat=cat: probe_point(
                h[keep_l], target, cat, seed
            ),
        )

    if age is not None:
        cleaned = clean_ordinal(age.values)
        if cleaned is not None:
            keep, y = cleaned
            counts = None if tc is None else tc[keep]
            bz = None if boot_z is None else boot_z[:, keep]
            scores = det.age_nulls(
                z[keep],
                y,
                token_counts=counts,
                boot_z=bz,
                rng=_rng(seed, layer, "age_null"),
                n_null=n_null,
            )
            la = det.local_anisotropy(z[keep])
            idx = boot_indices(len(y), n_boot, _rng(seed, layer, "local_anisotropy"))
            nan = float("nan")
            scores.append(
                Score("age_local_anisotropy", *mean_ci(la, idx), nan, len(y), "phenomenon")
            )
            below = y[y < 18]
            for sc in scores:
                row = _row(sc, layer, age.name, ctx)
                if sc.metric.startswith("age_step") and len(below):
                    row["age_from"] = float(below.max())  # the a-priori step's lower age
                rows.append(row)
            stab("age_jump_ratio", age.name, lambda h: det.jump(y, h[keep], counts)[0])
    if has_prog:
        series, stage, ok = _prog_arrays(info)
        bz = None if boot_z is None else boot_z[:, ok]
        pairs = det.progression_nulls(
            z[ok],
            series[ok],
            stage[ok],
            rng=_rng(seed, layer, "progression_null"),
            n_perm=n_null,
            boot_z=bz,
        )
        if halves is not None:
            pairs += det.progression_noise_floor(halves[:, :, ok], series[ok], stage[ok])
        rows += [_row(sc, layer, label, ctx) for label, sc in pairs]
        if halves is not None:
            both = np.array(
                [
                    [det.progression_point(halves[s, h][ok], series[ok], stage[ok]) for h in (0, 1)]
                    for s in range(len(halves))
                ]
            )  # (n_splits, 2 halves, 2 metrics)
            for mi, metric in enumerate(("progression_circularity", "progression_tour_ratio")):
                halves_profile.setdefault((metric, "mean"), []).append(both[..., mi])
    if contrast is not None:
        a, b = contrast
        cc = _contrast_codes(a, b)
        if cc is not None:
            keep, codes_a, codes_b = cc
            zk = z[keep]
            dist = np.clip(pairwise_distances(zk, metric="cosine"), 0.0, None)
            np.fill_diagonal(dist, 0.0)
            prefix = f"{a.name}_minus_{b.name}"
            scores = det.contrast_nulls(
                zk,
                codes_a,
                codes_b,
                dist,
                rng=_rng(seed, layer, "contrast_null"),
                n_perm=n_null,
                k=k,
                prefix=prefix,
            )
            rows += [_row(sc, layer, f"{a.name}-{b.name}", ctx) for sc in scores]
            kk = int(min(k, len(codes_a) - 1))

            def purity_diff(h):
                hk = h[keep]
                if not np.isfinite(hk).all():
                    return float("nan")
                nb = knn_indices(hk, kk)
                return float((knn_agreement(codes_a, nb) - knn_agreement(codes_b, nb)).mean())

            stab(f"{prefix}_purity", f"{a.name}-{b.name}", purity_diff)
    return rows


def _stability_rows(halves_profile: dict, ctx: dict, n_items: int) -> list[dict]:
    """Split-half reliability of each detector's layer profile (layer = -1, technique
    ``stability``): per split, the Spearman–Brown corrected correlation over layers of the
    profiles on the two template halves; value = mean over splits, CI = their 95 % range."""
    rows = []
    for (metric, label), per_layer in halves_profile.items():
        arr = np.stack(per_layer)  # (n_layers, n_splits, 2)
        rel = np.array(
            [det.profile_reliability(arr[:, s, 0], arr[:, s, 1]) for s in range(arr.shape[1])]
        )
        sc = det.null_score(f"{metric}_split_half", rel, n_items, technique="stability")
        rows.append(_row(sc, -1, label, ctx))
    return rows


def _umap_progression_rows(e, info, layer, ctx, *, seed, n_null) -> list[dict]:
    """Circularity on the 2-D UMAP (is the circle a UMAP artefact?), with its nulls."""
    series, stage, ok = _prog_arrays(info)
    e = np.asarray(e, dtype=np.float64)[ok]
    pairs = det.path_circularities(e, series[ok], stage[ok], "progression_circularity_umap")
    pairs += det.progression_nulls(
        e,
        series[ok],
        stage[ok],
        rng=_rng(seed, layer, "umap_progression_null"),
        n_perm=n_null,
        prefix="progression_umap",
    )
    return [_row(sc, layer, label, ctx) for label, sc in pairs]


def _umap30_rows(
    zs, layer_ids, info, ctx, *, seed, n_boot, n_null, metric, n_neighbors, n_epochs, contrast
) -> list[dict]:
    """The paper's silhouettes: per layer a 30-d UMAP, silhouette (Euclidean) per categorical
    label with a label-permutation null, and the contrast's silhouette difference."""
    from sklearn.metrics import pairwise_distances, silhouette_samples

    from medmap.techniques.representation.scores import mean_ci, umap_embedding

    labels = [x for x in _scored_labels(info) if x[0].kind == "categorical"]
    cc = None if contrast is None else _contrast_codes(*contrast)
    if not labels:
        return []
    rows: list[dict] = []
    nan = float("nan")
    for layer, z in zip(layer_ids, zs):
        e = umap_embedding(
            z, 30, seed=seed, metric=metric, n_neighbors=n_neighbors, n_epochs=n_epochs
        )
        if e is None:
            return rows
        dist = pairwise_distances(e)
        np.fill_diagonal(dist, 0.0)
        for lab, keep, codes in labels:
            d = dist[np.ix_(keep, keep)]
            sil = silhouette_samples(d, codes, metric="precomputed")
            null = det.silhouette_perm_null(
                d, codes, rng=_rng(seed, layer, f"umap30:{lab.name}"), n_perm=n_null
            )
            idx = boot_indices(len(codes), n_boot, _rng(seed, layer, f"umap30_boot:{lab.name}"))
            base = float(np.mean(null))
            sc = Score("silhouette_umap30", *mean_ci(sil, idx), base, len(codes), "umap")
            rows.append(_row(sc, layer, lab.name, ctx))
            null_sc = det.null_score("silhouette_umap30_perm_null", null, len(codes), "umap")
            rows.append(_row(null_sc, layer, lab.name, ctx))
        if cc is not None:
            a, b = contrast
            keep, ca, cb = cc
            d = dist[np.ix_(keep, keep)]
            diff = silhouette_samples(d, ca, metric="precomputed") - silhouette_samples(
                d, cb, metric="precomputed"
            )
            idx = boot_indices(len(ca), n_boot, _rng(seed, layer, "umap30_boot:contrast"))
            prefix = f"{a.name}_minus_{b.name}"
            label = f"{a.name}-{b.name}"
            sc = Score(
                f"{prefix}_silhouette_umap30", *mean_ci(diff, idx), nan, len(ca), "phenomenon"
            )
            rows.append(_row(sc, layer, label, ctx))
            for s in det.contrast_nulls(
                e[keep],
                ca,
                cb,
                d,
                rng=_rng(seed, layer, "umap30:contrast"),
                n_perm=n_null,
                prefix=prefix,
                suffix="_umap30",
            ):
                rows.append(_row(s, layer, label, ctx))
    return rows


def _coords_frame(
    emb: list[np.ndarray], layers: list[int], n_layers: int, info: ItemInfo, method: str
) -> pd.DataFrame:
    fixed = {"layer", "relative_depth", "item_id", "concept", "x", "y", "method", "preprocess"}
    fixed |= {"concept_set", "model"}
    frames = []
    for layer, e in zip(layers, emb):
        d: dict[str, Any] = {
            "layer": layer,
            "relative_depth": relative_depth(layer, n_layers),
            "item_id": info.ids,
            "concept": info.concepts,
            "x": e[:, 0].astype(np.float64),
            "y": e[:, 1].astype(np.float64),
            "method": method,
        }
        for lab in info.labels:
            col = f"label_{lab.name}" if lab.name in fixed else lab.name
            raw = lab.raw
            if not (
                all(_is_number(v) or v is None for v in raw)
                or all(isinstance(v, str) or v is None for v in raw)
            ):
                raw = [None if v is None else str(v) for v in raw]
            d[col] = raw
        frames.append(pd.DataFrame(d))
    return pd.concat(frames, ignore_index=True)


def representation_scores(
    acts: np.ndarray,
    concepts_or_labels: Any,
    *,
    model_name: str = "model",
    n_layers: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> pd.DataFrame:
    """The tidy table of :func:`analyse_activations` without UMAP (arrays in, no model needed).

    ``acts`` ``(n_items, n_layers_kept, d_model)`` (or per prompt with ``item_index=``); other
    keyword arguments as in :func:`analyse_activations`.
    """
    kwargs.setdefault("umap", False)
    return analyse_activations(
        acts, concepts_or_labels, model_name=model_name, n_layers=n_layers, seed=seed, **kwargs
    ).table
