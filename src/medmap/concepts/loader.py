"""Load concept sets from the bundled library or from user YAML/CSV files, with exact errors.

Every problem raises :class:`~medmap.errors.ConceptFileError` naming the file, the line (YAML) or
row (CSV) and the field. Nothing is dropped silently: an empty CSV row is an error, not a skip.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from medmap.concepts.schema import ID_RE, ConceptSet
from medmap.errors import ConceptFileError

# Bundled sets in map order: medical families first, then their non-medical controls.
CANONICAL_ORDER = (
    "ages",
    "symptoms",
    "diseases",
    "progression",
    "drugs",
    "dosages",
    "years",
    "occupations",
    "countries",
    "animals",
)
SUFFIXES = (".yaml", ".yml", ".csv")


def _data_dir() -> Path:
    return Path(str(resources.files("medmap.concepts").joinpath("data")))


def list_concepts() -> list[str]:
    """Names of the bundled concept sets (medical sets first, then the control sets)."""
    names = sorted(p.stem for p in _data_dir().glob("*.yaml"))
    rank = {n: i for i, n in enumerate(CANONICAL_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def load_concepts(name_or_path: str | Path | ConceptSet) -> ConceptSet:
    """A validated :class:`ConceptSet`: a bundled name (``"drugs"``) or a ``.yaml``/``.csv`` path."""
    if isinstance(name_or_path, ConceptSet):
        return name_or_path
    s = str(name_or_path)
    if ID_RE.match(s) and (_data_dir() / f"{s}.yaml").is_file():
        return _load_bundled(s)
    p = Path(s).expanduser()
    if p.suffix.lower() in SUFFIXES or p.exists():
        return load_file(p)
    raise ConceptFileError(
        f"unknown concept set {s!r}",
        hint=f"bundled sets: {', '.join(list_concepts())}; or a path to a .yaml/.csv file",
    )


@functools.lru_cache(maxsize=32)
def _load_bundled(name: str) -> ConceptSet:
    cs = load_file(_data_dir() / f"{name}.yaml")
    if cs.name != name:
        raise ConceptFileError(f"bundled file {name}.yaml declares name {cs.name!r}")
    return cs


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ConceptFileError(
            f"concept file {path} does not exist", hint="give a bundled set name or a file path"
        )
    raw = path.read_bytes()
    if not raw.strip():
        raise ConceptFileError(f"concept file {path} is empty")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConceptFileError(
            f"{path}: line {line}: not UTF-8 text (byte {e.start})",
            hint="save the file as UTF-8",
        ) from None


def load_file(path: str | Path) -> ConceptSet:
    """Load one YAML or CSV concept file (see docs/concept-format.md)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ConceptFileError(
            f"concept file {path} has suffix {path.suffix!r}", hint="use .yaml, .yml or .csv"
        )
    text = _read_text(path)
    if path.suffix.lower() == ".csv":
        data, lines = _parse_csv(path, text)
        where = "row"
    else:
        data, lines = _parse_yaml(path, text)
        data = _resolve_includes(path, data, lines)
        where = "line"
    return _validate(path, data, lines, where)


# ---- YAML --------------------------------------------------------------------------------


def _parse_yaml(path: Path, text: str) -> tuple[dict[str, Any], list[int]]:
    """The document and, per item, the 1-based line where it starts."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConceptFileError(f"{path}: {line}invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConceptFileError(
            f"{path}: the file must be a mapping with keys name, version, family, items, ..."
        )
    lines: list[int] = []
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.value == "items" and isinstance(v, yaml.SequenceNode):
                lines = [n.start_mark.line + 1 for n in v.value]
    return data, lines


def _resolve_includes(path: Path, data: dict[str, Any], lines: list[int]) -> dict[str, Any]:
    """``include: [more.csv, ...]`` appends the items of files in the same directory tree."""
    inc = data.pop("include", None)
    if inc is None:
        return data
    if isinstance(inc, str):
        inc = [inc]
    base = path.resolve().parent
    items = list(data.get("items") or [])
    for rel in inc:
        target = (base / str(rel)).resolve()
        if not target.is_relative_to(base):
            raise ConceptFileError(
                f"{path}: include {rel!r} points outside the concept file's directory",
                hint="included files must sit in the same directory or below it",
            )
        if not target.is_file():
            raise ConceptFileError(f"{path}: included file {rel!r} does not exist")
        parse = _parse_csv if target.suffix.lower() == ".csv" else _parse_yaml
        more = parse(target, _read_text(target))[0].get("items") or []
        items += more
        lines += [0] * len(more)
    data["items"] = items
    return data


# ---- CSV ---------------------------------------------------------------------------------

_COL = re.compile(r"^(label|target|answers|distractors):([a-z0-9_]+)(?::([a-z]+))?$")
_KINDS = ("categorical", "ordinal", "numeric", "identifier", "text")


def _number(s: str) -> int | float | None:
    try:
        return int(s)
    except ValueError:
        pass
    try:
        v = float(s)
    except ValueError:
        return None
    return v if v == v else None


def _parse_csv(path: Path, text: str) -> tuple[dict[str, Any], list[int]]:
    """CSV: one row per item; see docs/concept-format.md for the columns."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ConceptFileError(f"{path} is empty") from None
    except csv.Error as e:
        raise ConceptFileError(f"{path}: row 1: {e}") from None
    for req in ("id", "concept"):
        if req not in header:
            raise ConceptFileError(
                f"{path}: row 1: missing column {req!r}",
                hint="columns: id, concept, source, template, label:<name>, target:<id>, "
                "answers:<id>, distractors:<id>",
            )
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise ConceptFileError(f"{path}: row 1: column {dup[0]!r} appears twice")
    kinds: dict[str, str | None] = {}
    for h in header:
        if h in ("id", "concept", "source", "template"):
            continue
        m = _COL.match(h)
        if not m:
            raise ConceptFileError(
                f"{path}: row 1: unknown column {h!r}",
                hint="allowed: id, concept, source, template, label:<name>[:<kind>], "
                "target:<id>, answers:<id>, distractors:<id>",
            )
        if m.group(1) == "label":
            if m.group(3) and m.group(3) not in _KINDS:
                raise ConceptFileError(
                    f"{path}: row 1: column {h!r} has unknown kind {m.group(3)!r}",
                    hint=f"kinds: {', '.join(_KINDS)}",
                )
            kinds[m.group(2)] = m.group(3)
        elif m.group(3):
            raise ConceptFileError(f"{path}: row 1: column {h!r}: only labels take a :kind")
    tids = {_COL.match(h).group(2) for h in header if h.startswith(("target:", "answers:"))}
    for t in sorted(tids):
        for part in ("target", "answers"):
            if f"{part}:{t}" not in header:
                raise ConceptFileError(
                    f"{path}: row 1: column 'target:{t}' needs a matching 'answers:{t}' column"
                )
    for h in header:
        if h.startswith("distractors:") and f"target:{h.split(':', 1)[1]}" not in header:
            raise ConceptFileError(
                f"{path}: row 1: column {h!r} needs a matching 'target:{h.split(':', 1)[1]}' column"
            )
    templates: list[str] = []
    items: list[dict[str, Any]] = []
    lines: list[int] = []
    label_cols = {h: _COL.match(h).group(2) for h in header if h.startswith("label:")}
    raw_labels: dict[str, list[str]] = {n: [] for n in kinds}
    try:
        rows = list(reader)
    except csv.Error as e:
        raise ConceptFileError(f"{path}: row {reader.line_num}: {e}") from None
    for r, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ConceptFileError(
                f"{path}: row {r}: {len(row)} fields but the header has {len(header)}",
                hint="quote fields that contain commas",
            )
        cell = {h: v.strip() for h, v in zip(header, row)}
        if not any(cell.values()):
            raise ConceptFileError(f"{path}: row {r} is empty", hint="delete empty rows")
        if cell.get("template") and not cell["id"] and not cell["concept"]:
            templates.append(cell["template"])
            continue
        for req in ("id", "concept"):
            if not cell[req]:
                raise ConceptFileError(f"{path}: row {r}: field {req!r} is empty")
        item: dict[str, Any] = {"id": cell["id"], "concept": cell["concept"], "labels": {}}
        if cell.get("source"):
            item["source"] = cell["source"]
        if cell.get("template"):
            item["templates"] = [cell["template"]]
        for h, name in label_cols.items():
            if not cell[h]:
                raise ConceptFileError(f"{path}: row {r}: label {name!r} is empty")
            raw_labels[name].append(cell[h])
            item["labels"][name] = cell[h]
        targets = []
        for t in sorted(tids):
            prompt, answers = cell[f"target:{t}"], cell[f"answers:{t}"]
            if bool(prompt) != bool(answers):
                missing = "answers" if prompt else "target"
                raise ConceptFileError(f"{path}: row {r}: field '{missing}:{t}' is empty")
            distractors = cell.get(f"distractors:{t}", "")
            if distractors and not prompt:
                raise ConceptFileError(
                    f"{path}: row {r}: field 'distractors:{t}' is set but 'target:{t}' is empty"
                )
            if prompt:
                target = {"id": t, "prompt": prompt, "answers": answers.split("|")}
                if distractors:
                    target["distractors"] = distractors.split("|")
                targets.append(target)
        item["targets"] = targets
        items.append(item)
        lines.append(r)
    labels: dict[str, dict[str, str]] = {}
    for name, kind in kinds.items():
        numeric = bool(raw_labels[name]) and all(_number(v) is not None for v in raw_labels[name])
        kind = kind or ("ordinal" if numeric else "categorical")
        labels[name] = {"kind": kind}
        if kind in ("ordinal", "numeric"):
            for it, row_no in zip(items, lines):
                v = _number(it["labels"][name])
                if v is None:
                    raise ConceptFileError(
                        f"{path}: row {row_no}: label {name!r} ({kind}) must be a number, "
                        f"got {it['labels'][name]!r}"
                    )
                it["labels"][name] = v
    has_source = "source" in header
    data = {
        "name": re.sub(r"[^a-z0-9_]", "_", path.stem.lower()),
        "version": 1,
        "family": "custom",
        "medical": has_source,
        "description": f"user concept set from {path.name}",
        "labels": labels,
        "templates": templates,
        "items": items,
    }
    return data, lines


# ---- validation --------------------------------------------------------------------------


def _validate(path: Path, data: dict[str, Any], lines: list[int], where: str) -> ConceptSet:
    if not data.get("items"):
        raise ConceptFileError(f"{path}: the concept set has no items", hint="add items")
    try:
        return ConceptSet.model_validate(data)
    except ValidationError as e:
        raise ConceptFileError(
            _message(path, e, lines, where), hint="the rules are in docs/concept-format.md"
        ) from None


def _message(path: Path, e: ValidationError, lines: list[int], where: str) -> str:
    err = e.errors()[0]
    loc = list(err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see docs/concept-format.md)"
    elif err["type"] == "missing":
        msg = "required field is missing"
    prefix = ""
    if len(loc) >= 2 and loc[0] == "items" and isinstance(loc[1], int):
        i = loc[1]
        prefix = _at(i, lines, where)
        loc = loc[2:]
    else:
        m = re.match(r"item (\d+) ", msg)
        if m:
            prefix = _at(int(m.group(1)) - 1, lines, where)
    field = ".".join(str(x) for x in loc)
    return f"{path}: {prefix}{f'field {field!r}: ' if field else ''}{msg}"


def _at(i: int, lines: list[int], where: str) -> str:
    if i < len(lines) and lines[i]:
        return f"{where} {lines[i]}: "
    return f"item {i + 1}: "
