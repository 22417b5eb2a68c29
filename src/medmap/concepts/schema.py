"""Typed concept sets: the pydantic models every technique reads (contract: docs/concept-format.md).

A :class:`ConceptSet` holds items; each item has a concept (the words substituted for
``{concept}`` in templates), labels, the source of its facts, and targets (factual completions).
Rendering a template returns the prompt text and the character span of the concept in it, so
techniques can find the concept's tokens.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ID_RE = re.compile(r"^[a-z0-9_]+$")
FAMILIES = ("ages", "symptoms", "diseases", "progression", "drugs", "dosages", "control", "custom")
LabelKind = Literal["categorical", "ordinal", "numeric", "identifier", "text"]
LabelValue = str | int | float


def _fields(template: str) -> list[str]:
    """Placeholder names of a format string, in order (``{{`` escapes are not placeholders)."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a valid format string: {e}") from None


def check_template(template: str, label_names: set[str] | None = None) -> None:
    """Raise ``ValueError`` unless ``{concept}`` occurs exactly once and other fields are labels."""
    fields = _fields(template)
    n = fields.count("concept")
    if n != 1:
        raise ValueError(
            f"template {template!r} must contain the concept marker {{concept}} exactly once "
            f"(found {n})"
        )
    for f in fields:
        if f == "concept":
            continue
        if not f or (label_names is not None and f not in label_names):
            raise ValueError(
                f"template {template!r} uses {{{f}}}, which is not a label of the item "
                "(only {concept} and label names may appear in braces; write {{ for a brace)"
            )


def render_template(
    template: str, concept: str, labels: dict[str, Any]
) -> tuple[str, tuple[int, int]]:
    """Fill a template; returns the text and the concept's character span ``(start, end)``.

    A concept that opens the prompt is capitalised ("metformin is ..." → "Metformin is ...").
    """
    out: list[str] = []
    span = (0, 0)
    pos = 0
    for literal, field, spec, _conv in string.Formatter().parse(template):
        out.append(literal)
        pos += len(literal)
        if field is None:
            continue
        if field == "concept":
            value = concept[:1].upper() + concept[1:] if pos == 0 else concept
            span = (pos, pos + len(value))
        else:
            value = format(labels[field], spec or "")
        out.append(value)
        pos += len(value)
    return "".join(out), span


class LabelSpec(BaseModel):
    """How a label is read. ``order``: explicit order of an ordinal label's string values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: LabelKind
    order: list[str] | None = None
    description: str | None = None


class Target(BaseModel):
    """A factual completion: ``prompt`` (contains ``{concept}``) followed by any of ``answers``.

    ``distractors`` (optional): wrong completions for forced-choice scoring. They follow the
    answers' leading-space convention and never match an answer (compared like the pair builder
    compares answers: stripped, case-insensitive).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    prompt: str
    answers: list[str] = Field(min_length=1)
    distractors: list[str] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ID_RE.match(v):
            raise ValueError(f"target id {v!r} must match [a-z0-9_]+")
        return v

    @field_validator("answers")
    @classmethod
    def _answers(cls, v: list[str]) -> list[str]:
        for a in v:
            if not isinstance(a, str) or not a.strip():
                raise ValueError("every answer must be a non-empty string")
        return v

    @field_validator("distractors")
    @classmethod
    def _distractors(cls, v: list[str]) -> list[str]:
        seen: set[str] = set()
        for d in v:
            if not isinstance(d, str) or not d.strip():
                raise ValueError("every distractor must be a non-empty string")
            key = d.strip().casefold()
            if key in seen:
                raise ValueError(f"distractor {d!r} is listed twice")
            seen.add(key)
        return v

    @model_validator(mode="after")
    def _distractors_wrong(self) -> Target:
        answers = {a.strip().casefold() for a in self.answers}
        spaced = all(a.startswith(" ") for a in self.answers)
        for d in self.distractors:
            if d.strip().casefold() in answers:
                raise ValueError(
                    f"target {self.id!r}: distractor {d!r} is also an accepted answer "
                    "(distractors must be wrong answers)"
                )
            if spaced and not d.startswith(" "):
                raise ValueError(
                    f"target {self.id!r}: distractor {d!r} must start with a space, like the "
                    "answers (the completion follows the prompt)"
                )
        return self


class ConceptItem(BaseModel):
    """One concept with its labels, the source of its facts, and its targets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    concept: str
    labels: dict[str, LabelValue] = Field(default_factory=dict)
    source: str = ""
    templates: list[str] = Field(default_factory=list)
    targets: list[Target] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ID_RE.match(v):
            raise ValueError(f"item id {v!r} must match [a-z0-9_]+ (lower case, digits, _)")
        return v

    @field_validator("concept")
    @classmethod
    def _concept(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("concept is empty")
        if v != v.strip():
            raise ValueError(f"concept {v!r} has leading or trailing spaces")
        return v


@dataclass(frozen=True)
class RenderedPrompt:
    """A representation prompt. ``span``: character range of the concept in ``text``.

    ``template_index`` counts the set's templates first, then the item's own templates.
    """

    item_id: str
    item_index: int
    template_index: int
    text: str
    span: tuple[int, int]


@dataclass(frozen=True)
class RenderedTarget:
    """A causal prompt (completion follows it) with its accepted ``answers``."""

    item_id: str
    item_index: int
    target_id: str
    prompt: str
    span: tuple[int, int]
    answers: tuple[str, ...]
    distractors: tuple[str, ...] = ()


class ConceptSet(BaseModel):
    """A validated, versioned concept set (see docs/concept-format.md for every rule)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int = Field(ge=1)
    family: Literal[
        "ages", "symptoms", "diseases", "progression", "drugs", "dosages", "control", "custom"
    ]
    medical: bool
    description: str = ""
    control_for: str | None = None
    stratify: str | None = Field(
        default=None, description="categorical label that subsets are balanced on"
    )
    labels: dict[str, LabelSpec] = Field(default_factory=dict)
    templates: list[str] = Field(default_factory=list)
    items: list[ConceptItem] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not ID_RE.match(v):
            raise ValueError(f"set name {v!r} must match [a-z0-9_]+")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ConceptSet:
        names = set(self.labels)
        if self.stratify is not None and (
            self.stratify not in self.labels or self.labels[self.stratify].kind != "categorical"
        ):
            raise ValueError(f"stratify: {self.stratify!r} is not a categorical label of the set")
        for t in self.templates:
            check_template(t, names)
        for name, spec in self.labels.items():
            if not ID_RE.match(name):
                raise ValueError(f"label name {name!r} must match [a-z0-9_]+")
            if spec.order is not None and spec.kind != "ordinal":
                raise ValueError(f"label {name!r}: `order` is only allowed for ordinal labels")
        seen_id: dict[str, int] = {}
        seen_concept: dict[str, int] = {}
        for i, it in enumerate(self.items):
            where = f"item {i + 1} ({it.id!r})"
            if it.id in seen_id:
                raise ValueError(
                    f"{where}: duplicate item id (also item {seen_id[it.id] + 1}); "
                    "give every item its own id"
                )
            seen_id[it.id] = i
            key = it.concept.casefold()
            if key in seen_concept:
                raise ValueError(
                    f"{where}: duplicate concept {it.concept!r} (also item {seen_concept[key] + 1}); "
                    "list each concept once"
                )
            seen_concept[key] = i
            missing = names - set(it.labels)
            if missing:
                raise ValueError(f"{where}: label {sorted(missing)[0]!r} is missing")
            extra = set(it.labels) - names
            if extra:
                raise ValueError(
                    f"{where}: label {sorted(extra)[0]!r} is not declared under `labels:`"
                )
            for name, spec in self.labels.items():
                _check_value(where, name, spec, it.labels[name])
            if self.medical and not it.source.strip():
                raise ValueError(f"{where}: field 'source' is empty (medical facts need a source)")
            for t in it.templates:
                try:
                    check_template(t, names)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
            tids = Counter(t.id for t in it.targets)
            dup = [k for k, v in tids.items() if v > 1]
            if dup:
                raise ValueError(f"{where}: duplicate target id {dup[0]!r}")
            for t in it.targets:
                try:
                    check_template(t.prompt, names)
                except ValueError as e:
                    raise ValueError(f"{where}: target {t.id!r}: {e}") from None
            if not self.templates and not it.templates:
                raise ValueError(f"{where}: no template (set-level `templates:` or item templates)")
        if self.family == "progression":
            self._check_stages()
        return self

    def _check_stages(self) -> None:
        for need in ("series", "stage"):
            if need not in self.labels:
                raise ValueError(f"progression sets need a {need!r} label")
        stages: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for i, it in enumerate(self.items):
            stages[str(it.labels["series"])].append((self.ordinal_value("stage", it), i))
        for series, st in stages.items():
            values = [v for v, _ in st]
            for (a, _), (b, j) in zip(st, st[1:]):
                if not b > a:
                    raise ValueError(
                        f"item {j + 1} ({self.items[j].id!r}): stage order broken in series "
                        f"{series!r}: stage {b:g} follows stage {a:g} (stages must strictly "
                        "increase in file order, without duplicates)"
                    )
            if values[0] != 1:
                raise ValueError(f"series {series!r} must start at stage 1, not {values[0]:g}")

    # ---- reading -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.items)

    def ordinal_value(self, name: str, item: ConceptItem) -> float:
        """The numeric value of an ordinal/numeric label (string values → 1-based order index)."""
        spec = self.labels[name]
        v = item.labels[name]
        if spec.order is not None and isinstance(v, str):
            return float(spec.order.index(v) + 1)
        return float(v)

    def label_values(self, name: str) -> list[Any]:
        """One value per item, in item order: floats for ordinal/numeric labels, else strings."""
        if name not in self.labels:
            raise KeyError(f"concept set {self.name!r} has no label {name!r}")
        if self.labels[name].kind in ("ordinal", "numeric"):
            return [self.ordinal_value(name, it) for it in self.items]
        return [str(it.labels[name]) for it in self.items]

    def render(self) -> Iterator[RenderedPrompt]:
        """Every representation prompt: each item × (set templates, then its own templates)."""
        for i, it in enumerate(self.items):
            for j, t in enumerate([*self.templates, *it.templates]):
                text, span = render_template(t, it.concept, it.labels)
                yield RenderedPrompt(it.id, i, j, text, span)

    def targets(self) -> Iterator[RenderedTarget]:
        """Every causal prompt of every item, in item order."""
        for i, it in enumerate(self.items):
            for t in it.targets:
                prompt, span = render_template(t.prompt, it.concept, it.labels)
                yield RenderedTarget(
                    it.id, i, t.id, prompt, span, tuple(t.answers), tuple(t.distractors)
                )

    def stratify_label(self) -> str | None:
        """The label a subset is balanced on: ``stratify`` if set, ``series`` if present, else
        the first categorical label."""
        if self.stratify is not None:
            return self.stratify
        if "series" in self.labels:
            return "series"
        return next((n for n, s in self.labels.items() if s.kind == "categorical"), None)

    def subset(self, max_items: int, seed: int = 0) -> ConceptSet:
        """A deterministic subset of at most ``max_items`` items, in the original order.

        Balanced on :meth:`stratify_label` (largest-remainder allocation over its groups, random
        items within a group). Progression sets keep whole series, so stage order stays testable.
        Sets without a categorical label keep evenly spaced items (e.g. ages 0, 5, 10, ...).
        """
        if max_items < 2:
            raise ValueError("max_items must be at least 2")
        n = len(self.items)
        if n <= max_items:
            return self
        rng = random.Random(seed)
        label = self.stratify_label()
        if label is None:
            step = (n - 1) / (max_items - 1)
            keep = sorted({round(k * step) for k in range(max_items)})
        elif label == "series":
            groups = _groups(self, label)
            order = list(groups)
            rng.shuffle(order)
            keep = []
            for g in order:
                if len(keep) + len(groups[g]) <= max_items:
                    keep += groups[g]
            if not keep:  # one series longer than max_items: its evenly spaced stages
                g = groups[order[0]]
                step = (len(g) - 1) / (max_items - 1)
                keep = [g[round(k * step)] for k in range(max_items)]
        else:
            groups = _groups(self, label)
            quota = {g: max_items * len(v) / n for g, v in groups.items()}
            take = {g: int(q) for g, q in quota.items()}
            rest = max_items - sum(take.values())
            for g in sorted(quota, key=lambda g: (take[g] - quota[g], g))[:rest]:
                take[g] += 1
            keep = []
            for g, idx in groups.items():
                keep += rng.sample(idx, take[g])
        keep = sorted(set(keep))
        return self.model_copy(update={"items": [self.items[i] for i in keep]})


def _groups(cs: ConceptSet, label: str) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(cs.items):
        groups[str(it.labels[label])].append(i)
    return dict(sorted(groups.items()))


def _check_value(where: str, name: str, spec: LabelSpec, v: Any) -> None:
    if spec.kind in ("categorical", "identifier", "text"):
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{where}: label {name!r} must be a non-empty string, got {v!r}")
    elif spec.order is not None and isinstance(v, str):
        if v not in spec.order:
            raise ValueError(
                f"{where}: label {name!r} value {v!r} is not in its order {spec.order}"
            )
    elif isinstance(v, bool) or not isinstance(v, int | float) or v != v:
        raise ValueError(f"{where}: label {name!r} ({spec.kind}) must be a number, got {v!r}")
