"""Content checks for the bundled `diseases`, `progression` and `symptoms` concept sets.

The files are read with ``yaml.safe_load`` and checked against the concept-file contract
(docs/concept-format.md) plus medical consistency rules: ICD-10 code syntax, code inside the
WHO ICD-10 chapter it is labelled with, contiguous stages per progression series, consistent
target answers so counterfactual pairs are meaningful.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml

DATA = Path(__file__).resolve().parents[1] / "src" / "medmap" / "concepts" / "data"

ICD10_RE = re.compile(r"^[A-Z][0-9]{2}(\.[0-9A-Z]{1,2})?$")
ID_RE = re.compile(r"^[a-z0-9_]+$")
PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")

# WHO ICD-10 (2019 edition) chapters: (roman numeral, first category, last category, title).
WHO_CHAPTERS = [
    ("I", "A00", "B99", "Certain infectious and parasitic diseases"),
    ("II", "C00", "D48", "Neoplasms"),
    (
        "III",
        "D50",
        "D89",
        "Diseases of the blood and blood-forming organs and certain disorders involving the "
        "immune mechanism",
    ),
    ("IV", "E00", "E90", "Endocrine, nutritional and metabolic diseases"),
    ("V", "F00", "F99", "Mental and behavioural disorders"),
    ("VI", "G00", "G99", "Diseases of the nervous system"),
    ("VII", "H00", "H59", "Diseases of the eye and adnexa"),
    ("VIII", "H60", "H95", "Diseases of the ear and mastoid process"),
    ("IX", "I00", "I99", "Diseases of the circulatory system"),
    ("X", "J00", "J99", "Diseases of the respiratory system"),
    ("XI", "K00", "K93", "Diseases of the digestive system"),
    ("XII", "L00", "L99", "Diseases of the skin and subcutaneous tissue"),
    ("XIII", "M00", "M99", "Diseases of the musculoskeletal system and connective tissue"),
    ("XIV", "N00", "N99", "Diseases of the genitourinary system"),
    ("XV", "O00", "O99", "Pregnancy, childbirth and the puerperium"),
    ("XVI", "P00", "P96", "Certain conditions originating in the perinatal period"),
    ("XVII", "Q00", "Q99", "Congenital malformations, deformations and chromosomal abnormalities"),
    (
        "XVIII",
        "R00",
        "R99",
        "Symptoms, signs and abnormal clinical and laboratory findings, not elsewhere classified",
    ),
    ("XIX", "S00", "T98", "Injury, poisoning and certain other consequences of external causes"),
    ("XX", "V01", "Y98", "External causes of morbidity and mortality"),
    ("XXI", "Z00", "Z99", "Factors influencing health status and contact with health services"),
    ("XXII", "U00", "U99", "Codes for special purposes"),
]


def who_chapter(code: str) -> str:
    """Return 'ROMAN Title' of the WHO ICD-10 chapter whose category range holds `code`."""
    head = code[:3]
    hits = [f"{num} {title}" for num, lo, hi, title in WHO_CHAPTERS if lo <= head <= hi]
    assert len(hits) == 1, f"{code} falls in {len(hits)} chapters"
    return hits[0]


def _load(name: str) -> dict:
    with open(DATA / f"{name}.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def sets() -> dict[str, dict]:
    return {name: _load(name) for name in ("diseases", "progression", "symptoms")}


def _check_text(text: str, label_names: set[str], where: str) -> None:
    names = PLACEHOLDER_RE.findall(text)
    assert names.count("concept") == 1, f"{where}: {{concept}} must occur exactly once: {text!r}"
    extra = set(names) - {"concept"} - label_names
    assert not extra, f"{where}: unknown placeholders {extra} in {text!r}"


def test_chapter_table_matches_known_codes():
    assert who_chapter("E11").startswith("IV Endocrine")
    assert who_chapter("D48").startswith("II Neoplasms")
    assert who_chapter("D50").startswith("III Diseases of the blood")
    assert who_chapter("H59").startswith("VII ")
    assert who_chapter("H60").startswith("VIII ")
    assert who_chapter("T39").startswith("XIX ")
    assert who_chapter("R07").startswith("XVIII ")
    with pytest.raises(AssertionError):
        who_chapter("D49")  # gap between chapters II and III is not a valid category here


@pytest.mark.parametrize("name", ["diseases", "progression", "symptoms"])
def test_contract(sets, name):
    data = sets[name]
    assert data["name"] == name
    assert data["family"] == name
    assert data["medical"] is True
    assert isinstance(data["version"], int)
    labels = data["labels"]
    label_names = set(labels)
    assert len(data["templates"]) >= 4
    for i, tpl in enumerate(data["templates"]):
        _check_text(tpl, label_names, f"{name} template {i}")
    ids, concepts = Counter(), Counter()
    for row, item in enumerate(data["items"]):
        where = f"{name} item {row} ({item.get('id')})"
        assert ID_RE.match(item["id"]), where
        ids[item["id"]] += 1
        concepts[item["concept"].lower()] += 1
        assert set(item["labels"]) == label_names, where
        for lname, spec in labels.items():
            value = item["labels"][lname]
            if spec["kind"] in ("ordinal", "numeric"):
                assert isinstance(value, int | float) and not isinstance(value, bool), where
            else:
                assert isinstance(value, str) and value.strip(), where
        assert isinstance(item["source"], str) and item["source"].strip(), where
        assert item["targets"], f"{where}: needs >= 1 target"
        for tgt in item["targets"]:
            _check_text(tgt["prompt"], label_names, where)
            assert tgt["answers"], where
            for ans in tgt["answers"]:
                assert isinstance(ans, str) and ans.startswith(" ") and ans.strip(), (where, ans)
            assert len(set(tgt["answers"])) == len(tgt["answers"]), f"{where}: duplicate answers"
        tgt_ids = [t["id"] for t in item["targets"]]
        assert len(set(tgt_ids)) == len(tgt_ids), f"{where}: duplicate target ids"
    assert not [k for k, v in ids.items() if v > 1], "duplicate ids"
    assert not [k for k, v in concepts.items() if v > 1], "duplicate concepts"


def _pairs(items: list[dict], target_id: str) -> int:
    """Number of counterfactual pairs: items sharing `target_id` with disjoint answers."""
    answers = [set(t["answers"]) for it in items for t in it["targets"] if t["id"] == target_id]
    return sum(1 for a, b in itertools.combinations(answers, 2) if not a & b)


def _consistent_answers(items: list[dict], target_id: str) -> None:
    """Items whose answers for `target_id` share their first answer have identical lists."""
    by_first: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for it in items:
        for t in it["targets"]:
            if t["id"] == target_id:
                by_first[t["answers"][0]].add(tuple(t["answers"]))
    bad = {k: v for k, v in by_first.items() if len(v) > 1}
    assert not bad, f"inconsistent {target_id} answers: {bad}"


def test_diseases(sets):
    items = sets["diseases"]["items"]
    assert len(items) >= 120
    for it in items:
        code = it["labels"]["icd10"]
        assert ICD10_RE.match(code), (it["id"], code)
        assert it["labels"]["icd10_chapter"] == who_chapter(code), (it["id"], code)
        assert code in it["source"] and "ICD-10" in it["source"], it["id"]
    chapters = Counter(it["labels"]["icd10_chapter"] for it in items)
    specialties = Counter(it["labels"]["specialty"] for it in items)
    assert sum(1 for n in chapters.values() if n >= 6) >= 12, chapters
    assert sum(1 for n in specialties.values() if n >= 6) >= 12, specialties
    # the specialty target always accepts the labelled specialty itself
    for it in items:
        for t in it["targets"]:
            if t["id"] == "specialty":
                assert " " + it["labels"]["specialty"] in t["answers"], it["id"]
    _consistent_answers(items, "organ")
    assert _pairs(items, "organ") > 1000
    assert _pairs(items, "specialty") > 1000
    # spot checks against WHO ICD-10 2019
    by_concept = {it["concept"]: it["labels"] for it in items}
    assert by_concept["type 2 diabetes mellitus"]["icd10"] == "E11"
    assert by_concept["Parkinson's disease"]["icd10"] == "G20"
    assert by_concept["asthma"]["icd10"] == "J45"
    assert by_concept["acute myocardial infarction"]["icd10"] == "I21"
    assert by_concept["sarcoidosis"]["icd10_chapter"].startswith("III ")
    assert by_concept["cystic fibrosis"]["icd10_chapter"].startswith("IV ")


def test_symptoms(sets):
    items = sets["symptoms"]["items"]
    assert len(items) >= 80
    for it in items:
        code = it["labels"]["icd10"]
        assert ICD10_RE.match(code), (it["id"], code)
        assert code in it["source"], it["id"]
        typical = [d.strip() for d in it["labels"]["typical_diseases"].split(";")]
        assert typical and all(typical), it["id"]
        cause = next(t for t in it["targets"] if t["id"] == "cause")
        # every typical disease is an accepted completion of the cause prompt
        assert {" " + d for d in typical} <= set(cause["answers"]), it["id"]
    systems = Counter(it["labels"]["body_system"] for it in items)
    assert sum(1 for n in systems.values() if n >= 6) >= 8, systems
    r_codes = [it for it in items if who_chapter(it["labels"]["icd10"]).startswith("XVIII ")]
    assert len(r_codes) >= 0.6 * len(items)
    by_concept = {it["concept"]: it["labels"]["icd10"] for it in items}
    assert by_concept["chest pain"] == "R07.4"
    assert by_concept["hemoptysis"] == "R04.2"
    assert by_concept["cough"] == "R05"
    assert by_concept["polyuria"] == "R35"
    _consistent_answers(items, "system")
    assert _pairs(items, "system") > 500
    assert _pairs(items, "cause") > 500


def test_progression(sets):
    items = sets["progression"]["items"]
    series: dict[str, list[dict]] = defaultdict(list)
    for it in items:  # file order
        series[it["labels"]["series"]].append(it)
    assert len(series) >= 8
    for name, rows in series.items():
        stages = [r["labels"]["stage"] for r in rows]
        assert all(isinstance(s, int) for s in stages), name
        assert stages == list(range(1, len(rows) + 1)), f"{name}: stages {stages}"
        n = len(rows)
        assert n >= 3, name
        for r in rows:
            expected = (r["labels"]["stage"] - 1) / (n - 1)
            assert r["labels"]["severity_fraction"] == pytest.approx(expected, abs=1e-4), r["id"]
        assert len({r["source"].split(";")[0] for r in rows}) == 1, f"{name}: one guideline"
    # prognosis targets: favourable only for first stages, poor only for last stages
    for it in items:
        for t in it["targets"]:
            if t["id"] != "severity":
                continue
            if " poor" in t["answers"]:
                assert it["labels"]["severity_fraction"] == 1.0, it["id"]
            else:
                assert " good" in t["answers"], it["id"]
                assert it["labels"]["severity_fraction"] == 0.0, it["id"]
    assert _pairs(items, "severity") >= 10
    # `next` targets name the following stage of the same series where it is a stage phrase
    by_id = {it["id"]: it for it in items}
    ckd = [by_id[f"stage_{g}_chronic_kidney_disease"] for g in ("g1", "g2", "g3a", "g3b", "g4")]
    for cur, nxt in zip(ckd, ckd[1:] + [None], strict=True):
        answers = next(t["answers"] for t in cur["targets"] if t["id"] == "next")
        if nxt is not None:
            assert " " + nxt["concept"] in answers, cur["id"]
    g3a = by_id["stage_g3a_chronic_kidney_disease"]["labels"]["stage_name"]
    assert "45-59" in g3a
    assert by_id["nyha_class_iv_heart_failure"]["labels"]["severity_fraction"] == 1.0


@pytest.mark.parametrize("name", ["diseases", "progression", "symptoms"])
def test_loads_through_medmap_loader(sets, name):
    """The bundled files load through the package loader with every item intact."""
    from medmap.concepts import load_concepts

    loaded = load_concepts(name)
    assert loaded.name == name
    assert [it.id for it in loaded.items] == [it["id"] for it in sets[name]["items"]]
    assert len(loaded.templates) == len(sets[name]["templates"])
