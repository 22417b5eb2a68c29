"""Turn a concept set (``medmap.concepts``) into the plain strings the causal techniques take."""

from __future__ import annotations

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
