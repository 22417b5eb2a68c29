"""The technique interface: what every technique declares so that one runner can drive it.

A technique (representation maps, weight saliency, lesioning, patching, ...) is a
:class:`Technique` subclass. It declares

- ``name``: its name in ``RunConfig.techniques`` and in the run directory (``parts/<name>/``);
- ``map_rows``: the knowledge-map rows (:data:`medmap.analysis.maps.MAPS`) its tidy rows feed;
- :meth:`Technique.cells`: its work cells for a run (default: one per concept set);
- :meth:`Technique.run_cell`: compute one cell, returning tidy rows
  (:mod:`medmap.analysis.results`);
- optionally :meth:`Technique.finish`: rows computed from all of its finished cells together.

The runner (:mod:`medmap.run.runner`), Ray (:mod:`medmap.run.ray`), ``medmap map`` and the
single-technique commands (``medmap umap|saliency|lesion|patch``) all go through this interface
(:func:`medmap.run.execute.run_cell`). Registering a technique is one call of :func:`register`,
either with an instance or, for the built-in ones (below), lazily with ``"module:Class"`` so
that importing the registry imports no model code. See ``docs/techniques.md``.

This module imports nothing heavy: the registry's names are read by :mod:`medmap.run.config`.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from medmap.errors import MedmapError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from medmap.concepts import ConceptSet
    from medmap.model.loading import MedmapModel
    from medmap.run.config import RunConfig
    from medmap.run.rundir import Run
    from medmap.techniques.knowledge import Choice


# The one vocabulary of token positions. Each technique accepts the subset that makes sense for
# it (capture: last, mean or spans; representation maps: concept, last; patching: last,
# concept, all); no technique uses another name for any of these.
POSITIONS: dict[str, str] = {
    "concept": "the tokens of the item's concept span (averaged where one vector is needed)",
    "last": "the last real token of the prompt",
    "all": "every real token of the prompt (each one patched)",
    "mean": "the mean over every real token of the prompt",
}


def cell_id(spec: str) -> str:
    """File-name-safe id of a concept-set spec: the bundled name, or ``<stem>-<hash>`` of a path."""
    if re.fullmatch(r"[a-z0-9_]+", spec):
        return spec
    p = Path(spec).expanduser().resolve()
    stem = re.sub(r"[^a-z0-9_]", "_", p.stem.lower())
    return f"{stem}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Cell:
    """One unit of a technique's work in a run.

    Attributes:
        technique: the technique's name.
        concept_set: the concept-set spec it covers (a bundled name or a path).
        key: its file-name-safe id inside ``parts/<technique>/`` (:func:`cell_id` of the set).
        options: anything else that narrows the cell (a layer range, a chunk ...); empty for
            the built-in techniques, whose cells are whole concept sets.
    """

    technique: str
    concept_set: str
    key: str
    options: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class RunContext:
    """What a technique sees of the run: the config, the run directory and the concept sets.

    ``strict``: a set the technique cannot use (e.g. no counterfactual pairs) is an error (the
    single-technique commands) instead of a skipped set with a note (``medmap map``).
    ``item_detail``: keep each cell's per-item frame (``parts/items/``, merged into
    ``items.parquet`` by the single-technique commands).
    """

    config: RunConfig
    run: Run
    concept_sets: list[str]
    strict: bool = False
    progress: bool = True
    item_detail: bool = False

    def keep_items(self, technique: str, cell: Cell, items: pd.DataFrame) -> None:
        """Store a cell's per-item detail (with ``item_detail``; before the cell itself, so a
        finished cell always has it)."""
        if self.item_detail:
            from medmap.run.outputs import write_parquet_atomic

            write_parquet_atomic(items, self.run.items_part(technique, cell.key))

    def note(self, text: str) -> None:
        """A one-line note on stderr (e.g. why a set was skipped)."""
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True).print(f"[yellow]{escape(text)}[/]")

    def load_set(self, spec: str, technique: Technique) -> ConceptSet:
        """The concept set of a cell, subset to the technique's item budget.

        ``max_items`` means one thing everywhere: a stratified, seeded subset
        (``ConceptSet.subset(max_items, seed)``); representation maps may have their own budget
        (``umap_max_items``).
        """
        from medmap.concepts import load_concepts

        cs = load_concepts(spec)
        cap = technique.item_budget(self.config)
        if cap is not None and len(cs.items) > cap:
            cs = cs.subset(cap, seed=self.config.seed)
        return cs

    def trim_targets(self, cs: ConceptSet) -> ConceptSet:
        """Keep the first ``config.max_targets`` targets of each item."""
        if self.config.max_targets is None:
            return cs
        k = self.config.max_targets
        items = [it.model_copy(update={"targets": it.targets[:k]}) for it in cs.items]
        return cs.model_copy(update={"items": items})

    # -- known facts (the knows stage) -------------------------------------------------------
    def knows_items(self, spec: str) -> pd.DataFrame | None:
        """The knows stage's per-target forced choice of a set (``None`` if it has not run)."""
        import pandas as pd

        p = self.run.knows_part(cell_id(spec))
        return pd.read_parquet(p) if p.exists() else None

    def causal_set(self, spec: str, technique: Technique) -> ConceptSet | None:
        """The concept set a causal technique runs on: targets trimmed (``max_targets``), then,
        with ``config.known_only``, only the targets the knows stage found known, then the
        technique's stratified item budget. ``None`` (with a note) when fewer than
        ``config.min_known`` targets are known: the set is "too few known facts", not mapped.

        The knows stage scores the whole (trimmed) set, so the budget is filled with known items
        wherever the set has enough.
        """
        from medmap.concepts import load_concepts

        cs = self.trim_targets(load_concepts(spec))
        if self.config.known_only:
            from medmap.techniques.knowledge import known_only

            df = self.knows_items(spec)
            if df is None:
                raise MedmapError(
                    f"the knows stage has not scored {spec!r}",
                    hint="run it first (it is part of every known-only run), or set known_only = false",
                )
            kept = known_only(cs, df, min_known=self.config.min_known)
            if kept is None:
                self.note(
                    f"{technique.name} skipped for {cs.name}: too few known facts "
                    f"({int(df['known'].sum())} known, fewer than min_known = {self.config.min_known})"
                )
                return None
            cs = kept
        cap = technique.item_budget(self.config)
        if cap is not None and len(cs.items) > cap:
            cs = cs.subset(cap, seed=self.config.seed)
        return cs

    def choices(self, spec: str) -> dict[str, Choice]:
        """Forced-choice candidates per target (``"item_id/target_id"``), as the knows stage
        scores them: distractors from the whole (trimmed) set, ``config.knows_distractors`` of
        them, seeded by ``config.seed``. With ``known_only`` the knows stage's best accepted answer
        comes first in ``accepted`` (the answer the causal techniques score); otherwise the
        file's first accepted answer does, whether or not the knows stage ran."""
        from medmap.concepts import load_concepts
        from medmap.techniques.knowledge import forced_choices

        cs = self.trim_targets(load_concepts(spec))
        targets = list(cs.targets())
        real, _, _ = forced_choices(
            targets, max_distractors=self.config.knows_distractors, seed=self.config.seed
        )
        out = {f"{t.item_id}/{t.target_id}": c for t, c in zip(targets, real)}
        df = self.knows_items(spec) if self.config.known_only else None
        if df is not None:
            for r in df[["item_id", "target_id", "best_answer"]].itertuples(index=False):
                key = f"{r.item_id}/{r.target_id}"
                c = out.get(key)
                if c is not None and r.best_answer in c.accepted:
                    rest = tuple(a for a in c.accepted if a != r.best_answer)
                    out[key] = type(c)((r.best_answer, *rest), c.distractors)
        return out


class Technique:
    """Base class of a technique (see the module docstring). Subclasses set the class attributes
    and implement :meth:`run_cell`."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # plural noun for messages ("representation maps")
    map_rows: ClassVar[tuple[str, ...]] = ()
    needs_targets: ClassVar[bool] = True  # items must have ``targets:`` (checked before a run)
    min_items: ClassVar[int] = 1  # fewest items per set (checked before a run)

    def item_budget(self, config: RunConfig) -> int | None:
        """Items per concept set for this technique (a stratified subset); ``None`` = all."""
        return config.max_items

    def cells(self, ctx: RunContext) -> list[Cell]:
        """The technique's cells of a run, in merge order (default: one per concept set)."""
        return [Cell(self.name, s, cell_id(s)) for s in ctx.concept_sets]

    def run_cell(self, model: MedmapModel, cell: Cell, ctx: RunContext) -> pd.DataFrame:
        """Compute one cell; return its tidy rows (``model``/``concept_set`` are filled in)."""
        raise NotImplementedError

    def finish(self, ctx: RunContext, frames: list[pd.DataFrame]) -> pd.DataFrame | None:
        """Rows computed from all finished cells together (e.g. per-set summaries); ``None``
        (the default) adds nothing."""
        return None

    def __repr__(self) -> str:
        return f"<technique {self.name}: feeds {', '.join(self.map_rows) or 'no map row'}>"


class _Registry(Mapping[str, Technique]):
    """Name → technique, in registration order (the merge order of a run's table)."""

    def __init__(self) -> None:
        self._targets: dict[str, str | Technique] = {}

    def add(self, name: str, target: str | Technique) -> None:
        self._targets[name] = target

    def __getitem__(self, name: str) -> Technique:
        target = self._targets.get(name)
        if target is None:
            raise MedmapError(
                f"unknown technique {name!r}", hint=f"use one of {', '.join(self._targets)}"
            )
        if isinstance(target, str):
            module, _, cls = target.partition(":")
            target = getattr(importlib.import_module(module), cls)()
            if target.name != name:
                raise MedmapError(
                    f"technique {module}:{cls} is named {target.name!r}, not {name!r}"
                )
            self._targets[name] = target
        return target

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._targets))

    def __len__(self) -> int:
        return len(self._targets)


TECHNIQUES: _Registry = _Registry()


def register(technique: Technique | str, target: str | None = None) -> None:
    """Register a technique: ``register(MyTechnique())`` or, lazily, ``register("name",
    "package.module:ClassName")`` (imported on first use). A name registered again is replaced."""
    if isinstance(technique, Technique):
        if not technique.name:
            raise MedmapError(f"{type(technique).__name__} has no name")
        TECHNIQUES.add(technique.name, technique)
    elif target is not None:
        TECHNIQUES.add(str(technique), target)
    else:
        raise TypeError("register(Technique()) or register(name, 'module:Class')")


def technique_names() -> list[str]:
    """Names of the registered techniques, in merge order."""
    return list(TECHNIQUES)


def get_technique(name: str) -> Technique:
    """The registered technique called ``name`` (a :class:`MedmapError` naming the known ones)."""
    return TECHNIQUES[name]


# The built-in techniques, in the merge order of a run's results table (``knows``, forced-choice
# scoring of every item, first: the causal stages are meant to read it; opt-in for now).
register("knows", "medmap.techniques.knowledge:KnowsTechnique")
register("umap", "medmap.techniques.representation.model:RepresentationTechnique")
register("saliency", "medmap.techniques.saliency:SaliencyTechnique")
register("lesion", "medmap.techniques.lesioning:LesionTechnique")
register("patching", "medmap.techniques.patching:PatchingTechnique")
register("logit_lens", "medmap.techniques.logit_lens:LogitLensTechnique")

register_technique = register  # the name ``medmap.register_technique`` exports
