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


def concept_targets(cs, max_items: int | None = None) -> ConceptTargets:
    """Every rendered target of ``cs`` (``cs.targets()``), keeping the first ``max_items`` items.

    The target completion is the first accepted answer; ids are ``item_id/target_id``.
    """
    rendered = list(cs.targets())
    if max_items is not None:
        keep = sorted({t.item_index for t in rendered})[:max_items]
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
