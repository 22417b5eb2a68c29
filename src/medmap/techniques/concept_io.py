"""Turn a concept set (``medmap.concepts``) into the plain strings the causal techniques take.

Every ``*_concepts`` entry point (:func:`~medmap.techniques.lesioning.lesion_concepts`,
:func:`~medmap.techniques.patching.patch_concepts`,
:func:`~medmap.techniques.saliency.weight_saliency_concepts`) takes either a concept set (a
:class:`~medmap.concepts.ConceptSet`, a bundled name, a ``.yaml``/``.csv`` path, or a
duck-typed object with ``targets()``) or the plain strings directly (:func:`as_concept_set`,
:func:`plain_or_concepts`), and returns the same tidy rows either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from medmap.errors import MedmapError


@dataclass
class ConceptTargets:
    """Prompts, target completions (first accepted answer) and item ids of a concept set."""

    prompts: list[str]
    targets: list[str]
    ids: list[str]
    spans: list[tuple[int, int]]


def select_items(cs, max_items: int | None, seed: int = 0):
    """``max_items`` as everywhere: a stratified, seeded subset (``ConceptSet.subset``); the set
    itself when it is small enough. A duck-typed set without ``subset`` keeps its first items."""
    if max_items is None:
        return cs
    if not hasattr(cs, "subset"):
        return _FirstItems(cs, max_items)
    return cs.subset(max_items, seed=seed) if len(cs.items) > max_items else cs


class _FirstItems:
    def __init__(self, cs, n: int) -> None:
        self.cs, self.n, self.name = cs, n, getattr(cs, "name", "custom")

    def targets(self):
        rendered = list(self.cs.targets())
        keep = set(sorted({t.item_index for t in rendered})[: self.n])
        return [t for t in rendered if t.item_index in keep]


def concept_targets(cs, first_items: int | None = None) -> ConceptTargets:
    """Every rendered target of ``cs`` (``cs.targets()``), keeping the first ``first_items``
    items (saliency's per-set budget, ``RunConfig.saliency_items``; a set's ``max_items`` is a
    stratified subset, :func:`select_items`).

    The target completion is the first accepted answer; ids are ``item_id/target_id``.
    """
    rendered = list(cs.targets())
    if first_items is not None:
        keep = sorted({t.item_index for t in rendered})[:first_items]
        rendered = [t for t in rendered if t.item_index in set(keep)]
    if not rendered:
        raise MedmapError(
            f"concept set {getattr(cs, 'name', '?')!r} has no targets",
            hint="causal techniques need items with `targets:` (prompt and answers)",
        )
    return ConceptTargets(
        prompts=[t.prompt for t in rendered],
        targets=[t.answers[0] for t in rendered],
        ids=[f"{t.item_id}/{t.target_id}" for t in rendered],
        spans=[tuple(t.span) for t in rendered],
    )


def set_name(cs) -> str:
    return str(getattr(cs, "name", "custom"))


def as_concept_set(cs):
    """A bundled name or a file path loaded with :func:`medmap.concepts.load_concepts`; any
    other object (a ``ConceptSet``, or a duck-typed set with ``targets()``) as it is."""
    if isinstance(cs, str | os.PathLike):
        from medmap.concepts import load_concepts

        return load_concepts(cs)
    return cs


def check_one_source(cs, plain: dict[str, object], technique: str) -> bool:
    """Whether the plain strings ``plain`` (``{argument: value}``) are used instead of ``cs``;
    exactly one of the two must be given (one clear error otherwise)."""
    given = [k for k, v in plain.items() if v is not None]
    if cs is not None and given:
        raise MedmapError(
            f"{technique}: got a concept set and {', '.join(given)}",
            hint="pass either a concept set or the plain strings, not both",
        )
    if cs is None and len(given) < len(plain):
        missing = [k for k in plain if k not in given]
        raise MedmapError(
            f"{technique}: no concept set and no {', '.join(missing)}",
            hint=f"pass a concept set (object, bundled name or path) or {'=..., '.join(plain)}=...",
        )
    for k in given:
        if isinstance(plain[k], str):
            raise MedmapError(
                f"{technique}: {k} is one string, not a list", hint=f"pass {k}=[{plain[k]!r}]"
            )
    return cs is None


def plain_or_concepts(
    cs,
    *,
    prompts: Sequence[str] | None,
    targets: Sequence[str] | None,
    item_ids: Sequence[str] | None,
    concept_set: str | None,
    max_items: int | None,
    seed: int,
    technique: str,
) -> tuple[ConceptTargets, str]:
    """The items of a concept set or of plain strings, and the ``concept_set`` name of the rows.

    A concept set (:func:`as_concept_set`) gives its rendered targets (first accepted answer,
    ids ``item_id/target_id``) of a stratified subset of ``max_items`` items
    (:func:`select_items`) and its name (unless ``concept_set`` is given). Plain ``prompts`` and
    ``targets`` (one answer per prompt, same length) keep their first ``max_items`` items; ids
    are ``item_ids`` or the item index, the name ``concept_set`` or ``"custom"``.
    """
    if check_one_source(cs, {"prompts": prompts, "targets": targets}, technique):
        prompts, targets = [str(p) for p in prompts], [str(t) for t in targets]
        if len(prompts) != len(targets):
            raise MedmapError(f"{technique}: {len(prompts)} prompts but {len(targets)} targets")
        ids = [str(i) for i in range(len(prompts))] if item_ids is None else list(item_ids)
        if len(ids) != len(prompts):
            raise MedmapError(f"{technique}: {len(ids)} item ids for {len(prompts)} prompts")
        n = len(prompts) if max_items is None else max_items
        ct = ConceptTargets(prompts[:n], targets[:n], [str(i) for i in ids[:n]], [])
        return ct, concept_set or "custom"
    if item_ids is not None:
        raise MedmapError(
            f"{technique}: item_ids go with plain prompts",
            hint="a concept set names its items itself (item_id/target_id)",
        )
    cs = as_concept_set(cs)
    ct = concept_targets(select_items(cs, max_items, seed))  # stratified, as everywhere
    return ct, concept_set or set_name(cs)
