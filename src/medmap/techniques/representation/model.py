"""``representation_map``: capture a model's activations for a concept set, then analyse them."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medmap.errors import MedmapError
from medmap.techniques.base import Cell, RunContext, Technique
from medmap.techniques.representation.api import RepresentationResult, analyse_activations

if TYPE_CHECKING:  # pragma: no cover
    from medmap.model.loading import MedmapModel

POSITIONS = ("concept", "last")


def rendered_prompts(concepts, max_templates: int | None = None) -> list:
    """The set's rendered prompts, keeping templates ``0..max_templates-1`` of every item."""
    prompts = list(concepts.render())
    if max_templates is not None:
        kept = [p for p in prompts if p.template_index < max_templates]
        # An item whose only prompts are item-specific templates beyond the cut keeps its first.
        have = {p.item_index for p in kept}
        extra = {}
        for p in prompts:
            if p.item_index not in have and p.item_index not in extra:
                extra[p.item_index] = p
        prompts = kept
        if extra:
            prompts = sorted(
                kept + list(extra.values()), key=lambda p: (p.item_index, p.template_index)
            )
    if not prompts:
        raise MedmapError(f"concept set {concepts.name!r} renders no prompts")
    return prompts


def concept_token_counts(tokenizer, prompts: list, n_items: int) -> np.ndarray:
    """Per item, the (most common over its prompts) number of tokens covering the concept span."""
    from medmap.model.tokens import encode, span_tokens

    per_item: dict[int, Counter] = {}
    for p in prompts:
        batch = encode(tokenizer, [p.text])
        n = len(span_tokens(batch.offsets[0], tuple(p.span)))
        per_item.setdefault(p.item_index, Counter())[n] += 1
    return np.array([per_item[i].most_common(1)[0][0] for i in range(n_items)], dtype=np.int64)


def _captured(
    model,
    texts: list[str],
    pos: Any,
    layers,
    batch_size: int,
    progress: bool,
    store_dir: str | os.PathLike | None,
) -> np.ndarray:
    from medmap.techniques.capture import capture

    if store_dir is None:
        return capture(
            model, texts, layers=layers, position=pos, batch_size=batch_size, progress=progress
        )
    store_dir = Path(store_dir)
    if (store_dir / "manifest.json").exists():
        from medmap.model.sites import check_layers
        from medmap.techniques.capture.store import open_store

        arr, manifest = open_store(store_dir)
        stored = store_dir / "prompts.json"
        same = (
            manifest.get("model") == model.name
            and manifest.get("layers") == check_layers(layers, model.n_layers)
            and manifest.get("position") == str(pos)[:200]
            and stored.exists()
            and json.loads(stored.read_text()) == texts
        )
        if not same:
            raise MedmapError(
                f"{store_dir} holds activations of other prompts, layers or model",
                hint="delete that directory or use another output directory",
            )
        return arr
    return capture(
        model,
        texts,
        layers=layers,
        position=pos,
        batch_size=batch_size,
        progress=progress,
        out=store_dir,
    )


def representation_map(
    model: MedmapModel,
    concepts=None,
    *,
    prompts: list[str] | None = None,
    labels: dict | None = None,
    spans: list[tuple[int, int]] | None = None,
    concept_set: str | None = None,
    position: str = "concept",
    layers: list[int] | None = None,
    seed: int = 0,
    max_items: int | None = None,
    n_boot: int = 200,
    umap: bool = True,
    batch_size: int = 16,
    progress: bool = True,
    activations: np.ndarray | None = None,
    max_templates: int | None = None,
    store_dir: str | os.PathLike | None = None,
    **options: Any,
) -> RepresentationResult:
    """Representation map of ``model`` over a concept set: scores, detectors, UMAP per layer.

    Args:
        model: a :class:`medmap.MedmapModel` (``.name``, ``.n_layers``, ``.tokenizer``).
        concepts: a ConceptSet, the name of a bundled set or a ``.yaml``/``.csv`` path.
        prompts / labels / spans: instead of ``concepts``, plain strings: one prompt per item,
            ``labels`` ``{name: values}`` or ``{name: (kind, values)}`` (one value per item, see
            :func:`medmap.techniques.representation.api.item_info`) and per prompt the
            concept's character span ``(start, end)`` (needed by ``position="concept"``; also
            gives the concept token counts of the controlled age detector). ``max_items``
            keeps the first items; item ids are the index. Plain prompts carry no concept
            texts, so they get no surface baseline (concepts with a written amount).
        concept_set: the ``concept_set`` column (default: the set's name, or ``"custom"``).
        position: ``"concept"`` (default: the tokens of the concept span, averaged) or
            ``"last"`` (the last token of each prompt).
        layers: residual indices ``0..n_layers`` (default all).
        max_items: stratified subset of the set (``ConceptSet.subset(max_items, seed)``).
        n_boot: bootstrap resamples for every CI.
        umap: also compute the aligned per-layer UMAP coordinates.
        activations: pre-captured activations ``(n_prompts, n_layers_kept, d_model)`` of the
            rendered prompts (in render order, after ``max_templates``); skips the forward passes.
        max_templates: keep only the first templates of every item.
        store_dir: stream the captured activations to an on-disk store here; reused when it
            already holds the same prompts, layers and model.
        options: passed to :func:`medmap.techniques.representation.analyse_activations` (``scaling``,
            ``n_components``, ``align``, ``n_perm``, ...).

    Each item's activation is the mean over its templates (prompts); see
    :mod:`medmap.techniques.representation.features`. A concept set and plain strings give the
    same :class:`RepresentationResult` (tidy table and coordinates) for the same prompts and
    labels: plain prompts are a set with one template per item.
    """
    from medmap.techniques.concept_io import as_concept_set, check_one_source

    if position not in POSITIONS:
        raise MedmapError(f"unknown position {position!r}", hint="use 'concept' or 'last'")
    if check_one_source(concepts, {"prompts": prompts, "labels": labels}, "representation"):
        concepts, prompts, name = _plain_items(prompts, labels, spans, position, max_items)
        n_items = len(prompts)
    else:
        if spans is not None:
            raise MedmapError(
                "representation: spans go with plain prompts",
                hint="a concept set gives its concept spans itself",
            )
        concepts = as_concept_set(concepts)
        if max_items is not None and len(concepts.items) > max_items:
            concepts = concepts.subset(max_items, seed=seed)
        prompts = rendered_prompts(concepts, max_templates)
        name = concepts.name
        n_items = len(concepts.items)
    texts = [p.text for p in prompts]
    item_index = np.array([p.item_index for p in prompts], dtype=np.int64)
    pos: Any = [tuple(p.span) for p in prompts] if position == "concept" else "last"
    layer_ids = list(range(model.n_layers + 1)) if layers is None else [int(x) for x in layers]
    if activations is None:
        activations = _captured(model, texts, pos, layers, batch_size, progress, store_dir)
    elif np.shape(activations)[:2] != (len(texts), len(layer_ids)):
        raise MedmapError(
            f"activations have shape {np.shape(activations)}, expected "
            f"({len(texts)}, {len(layer_ids)}, d_model) for the rendered prompts and layers"
        )
    has_spans = all(p.span is not None for p in prompts)
    token_counts = concept_token_counts(model.tokenizer, prompts, n_items) if has_spans else None
    options.setdefault("tokenizer", model.tokenizer)  # the surface baseline's token counts
    return analyse_activations(
        activations,
        concepts,
        item_index=item_index,
        template_index=np.array([p.template_index for p in prompts], dtype=np.int64),
        layers=layer_ids,
        model_name=model.name,
        n_layers=model.n_layers,
        concept_set=concept_set or name,
        position=position,
        token_counts=token_counts,
        seed=seed,
        n_boot=n_boot,
        umap=umap,
        progress=progress,
        **options,
    )


def _plain_items(prompts, labels, spans, position: str, max_items: int | None):
    """Plain prompts (one per item) as rendered prompts of template 0, and their labels."""
    from medmap.concepts.schema import RenderedPrompt

    n = len(prompts) if max_items is None else min(max_items, len(prompts))
    if spans is not None and len(spans) != len(prompts):
        raise MedmapError(f"representation: {len(spans)} spans for {len(prompts)} prompts")
    if spans is None and position == "concept":
        raise MedmapError(
            "representation: position 'concept' needs spans with plain prompts",
            hint="pass spans=[(start, end), ...] (the concept's characters) or position='last'",
        )
    if not isinstance(labels, Mapping):
        raise MedmapError(
            "representation: labels must be a mapping {name: values}",
            hint="e.g. labels={'organ': ['heart', 'liver', 'lung']}",
        )
    kept = {}
    for k, v in labels.items():
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
            kept[k] = (v[0], list(v[1])[:n])
        else:
            kept[k] = list(v)[:n]
    rendered = [
        RenderedPrompt(
            str(i), i, 0, str(prompts[i]), None if spans is None else tuple(map(int, spans[i]))
        )
        for i in range(n)
    ]
    return kept, rendered, "custom"


class RepresentationTechnique(Technique):
    """Representation maps through the technique interface (:mod:`medmap.techniques.base`);
    also stores the activations and the UMAP coordinates of each set in the run directory."""

    name = "umap"
    title = "representation maps"
    map_rows = ("representation",)
    needs_targets = False
    min_items = 3

    def item_budget(self, config) -> int | None:
        return config.max_items if config.umap_max_items is None else config.umap_max_items

    def run_cell(self, model: MedmapModel, cell: Cell, ctx: RunContext):
        from medmap.run.outputs import write_parquet_atomic

        cfg = ctx.config
        cs = ctx.load_set(cell.concept_set, self)
        res = representation_map(
            model,
            cs,
            position=cfg.position,
            seed=cfg.seed,
            n_boot=cfg.n_boot,
            umap=cfg.umap,
            batch_size=cfg.batch_size,
            max_templates=cfg.max_templates,
            progress=ctx.progress,
            store_dir=ctx.run.activations(cs.name),
        )
        coords = res.coords.copy()
        coords.insert(0, "concept_set", cs.name)
        write_parquet_atomic(coords, ctx.run.coords_part(cs.name))
        return res.table
