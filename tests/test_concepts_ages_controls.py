"""Content checks for the bundled `ages` set and the four non-medical control sets.

The files are read with ``yaml.safe_load`` and checked against the concept-file contract
(docs/concept-format.md) plus content rules: contiguous ages and years, WHO-based life-stage
boundaries, spot-checked facts (capitals, continents, animal classes, ISCO-08 major groups),
and the counterfactual-pair precondition (items sharing a target id with disjoint answers).
"""

from __future__ import annotations

import itertools
import re
import string
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml

DATA = Path(__file__).resolve().parents[1] / "src" / "medmap" / "concepts" / "data"

ID_RE = re.compile(r"^[a-z0-9_]+$")
CONTROLS = {"countries": "diseases", "animals": "drugs", "occupations": "symptoms", "years": "ages"}
ALL_SETS = ["ages", *CONTROLS]
MEDICAL_FAMILIES = {"ages", "symptoms", "diseases", "progression", "drugs", "dosages"}


def _load(name: str) -> dict:
    with open(DATA / f"{name}.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def sets() -> dict[str, dict]:
    return {name: _load(name) for name in ALL_SETS}


def _fields(text: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]


def _check_text(text: str, label_names: set[str], where: str) -> None:
    fields = _fields(text)
    assert fields.count("concept") == 1, f"{where}: {{concept}} must occur exactly once: {text!r}"
    assert text.count("{concept}") == 1, f"{where}: {text!r}"
    for f in fields:
        assert f == "concept" or f in label_names, f"{where}: unknown placeholder {{{f}}}"


def _by_id(data: dict) -> dict[str, dict]:
    return {it["id"]: it for it in data["items"]}


def _answers(item: dict, target_id: str) -> list[str]:
    hits = [t["answers"] for t in item["targets"] if t["id"] == target_id]
    assert len(hits) == 1, f"{item['id']}: {len(hits)} targets {target_id!r}"
    return hits[0]


def _norm(answers: list[str]) -> set[str]:
    """Answer identity as the pair builder sees it (stripped, case-folded)."""
    return {a.strip().casefold() for a in answers}


def _n_pairs(items: list[dict], target_id: str) -> int:
    answers = [_norm(t["answers"]) for it in items for t in it["targets"] if t["id"] == target_id]
    return sum(1 for a, b in itertools.combinations(answers, 2) if not a & b)


def _answers_by_label(items: list[dict], target_id: str, label: str) -> dict[str, set]:
    """Map label value -> set of answer tuples used for `target_id` by items with that value."""
    out: dict[str, set] = defaultdict(set)
    for it in items:
        out[it["labels"][label]].add(tuple(_answers(it, target_id)))
    return out


def _groups_disjoint(groups: dict[str, set]) -> None:
    """Answers of items in different label groups never overlap."""
    flat = {k: set().union(*(_norm(list(a)) for a in v)) for k, v in groups.items()}
    for a, b in itertools.combinations(flat, 2):
        assert not flat[a] & flat[b], f"{a} and {b} share answers {flat[a] & flat[b]}"


# ---------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", ALL_SETS)
def test_contract(sets, name):
    data = sets[name]
    assert data["name"] == name
    assert isinstance(data["version"], int)
    assert isinstance(data["description"], str) and data["description"].strip()
    labels = data["labels"]
    label_names = set(labels)
    assert label_names
    for spec in labels.values():
        assert spec["kind"] in {"categorical", "ordinal", "numeric", "identifier", "text"}
    assert len(data["templates"]) >= 5
    assert len(set(data["templates"])) == len(data["templates"])
    for i, tpl in enumerate(data["templates"]):
        _check_text(tpl, label_names, f"{name} template {i}")
    ids, concepts = Counter(), Counter()
    for row, item in enumerate(data["items"]):
        where = f"{name} item {row} ({item.get('id')})"
        assert ID_RE.match(item["id"]), where
        ids[item["id"]] += 1
        concepts[item["concept"].casefold()] += 1
        assert item["concept"] == item["concept"].strip() and item["concept"], where
        assert set(item["labels"]) == label_names, where
        for lname, spec in labels.items():
            value = item["labels"][lname]
            if spec["kind"] in ("ordinal", "numeric"):
                assert isinstance(value, int | float) and not isinstance(value, bool), where
            else:
                assert isinstance(value, str) and value.strip(), where
        assert isinstance(item["source"], str) and item["source"].strip(), where
        for tpl in item.get("templates") or []:
            _check_text(tpl, label_names, where)
        assert item["targets"], f"{where}: needs >= 1 target"
        tgt_ids = [t["id"] for t in item["targets"]]
        assert len(set(tgt_ids)) == len(tgt_ids), f"{where}: duplicate target ids"
        for tgt in item["targets"]:
            assert ID_RE.match(tgt["id"]), where
            _check_text(tgt["prompt"], label_names, where)
            assert not tgt["prompt"].endswith(" "), f"{where}: prompt ends with a space"
            assert tgt["answers"], where
            for ans in tgt["answers"]:
                assert isinstance(ans, str) and ans.startswith(" ") and ans.strip(), (where, ans)
                assert not ans.startswith("  "), (where, ans)
            assert len(set(tgt["answers"])) == len(tgt["answers"]), f"{where}: duplicate answers"
    assert not [k for k, v in ids.items() if v > 1], "duplicate ids"
    assert not [k for k, v in concepts.items() if v > 1], "duplicate concepts"


@pytest.mark.parametrize("name", ALL_SETS)
def test_prompts_share_text_per_target_id(sets, name):
    """Items sharing a target id use the same prompt, so pair prompts differ only in the concept."""
    prompts: dict[str, set[str]] = defaultdict(set)
    for it in sets[name]["items"]:
        for t in it["targets"]:
            prompts[t["id"]].add(t["prompt"])
    assert {k: v for k, v in prompts.items() if len(v) > 1} == {}


@pytest.mark.parametrize(
    ("name", "target_id", "min_pairs"),
    [
        ("ages", "stage", 1000),
        ("ages", "care", 1000),
        ("countries", "capital", 1000),
        ("countries", "continent", 1000),
        ("animals", "class", 1000),
        ("animals", "diet", 1000),
        ("occupations", "workplace", 1000),
        ("years", "decade", 1000),
        ("years", "president", 1000),
    ],
)
def test_counterfactual_pair_precondition(sets, name, target_id, min_pairs):
    """Some items share the target id and have disjoint (normalised) answer sets."""
    items = sets[name]["items"]
    assert all(target_id in {t["id"] for t in it["targets"]} for it in items)
    assert _n_pairs(items, target_id) >= min_pairs


@pytest.mark.parametrize(
    ("name", "target_id", "label"),
    [
        ("ages", "stage", "life_stage"),
        ("ages", "care", "care_group"),
        ("animals", "class", "class"),
        ("animals", "diet", "diet"),
        ("occupations", "workplace", "workplace"),
        ("years", "decade", None),
        ("years", "president", None),
    ],
)
def test_first_answers_start_differently(sets, name, target_id, label):
    """answers[0] is the answer a pair compares; it starts with a content word, not " a"/" an",
    and (per label group) with a first word no other group's answers[0] starts with, so the
    first answer tokens of a pair differ."""
    first_word: dict[str, set[str]] = defaultdict(set)
    for it in sets[name]["items"]:
        first = _answers(it, target_id)[0]
        assert not re.match(r"^ (a|an) ", first), (it["id"], first)
        if label is not None:
            first_word[first.split()[0]].add(it["labels"][label])
    shared = {w: g for w, g in first_word.items() if len(g) > 1}
    assert not shared, f"groups whose first answers start with the same word: {shared}"


# ---------------------------------------------------------------------------- ages


def test_ages_header(sets):
    data = sets["ages"]
    assert data["family"] == "ages"
    assert data["medical"] is True
    assert data["control_for"] is None
    assert data["labels"]["age"]["kind"] in ("ordinal", "numeric")
    assert data["labels"]["life_stage"]["kind"] == "categorical"


def test_ages_contiguous(sets):
    items = sets["ages"]["items"]
    assert len(items) == 101
    assert [it["labels"]["age"] for it in items] == list(range(101))
    for it in items:
        age = it["labels"]["age"]
        assert it["id"] == f"age_{age:03d}"
        assert it["concept"] == f"{age}-year-old"
        assert it["labels"]["decade"] == age // 10


@pytest.mark.parametrize(
    ("age", "stage", "care"),
    [
        (0, "infant", "pediatric"),
        (1, "child", "pediatric"),
        (9, "child", "pediatric"),
        (10, "adolescent", "pediatric"),
        (17, "adolescent", "pediatric"),
        (18, "adolescent", "adult"),
        (19, "adolescent", "adult"),
        (20, "adult", "adult"),
        (64, "adult", "adult"),
        (65, "older adult", "older adult"),
        (100, "older adult", "older adult"),
    ],
)
def test_life_stage_boundaries(sets, age, stage, care):
    item = _by_id(sets["ages"])[f"age_{age:03d}"]
    assert item["labels"]["life_stage"] == stage
    assert item["labels"]["care_group"] == care


def test_life_stages_are_contiguous_ranges(sets):
    ranges: dict[str, list[int]] = defaultdict(list)
    for it in sets["ages"]["items"]:
        ranges[it["labels"]["life_stage"]].append(it["labels"]["age"])
    spans = {k: (min(v), max(v), len(v)) for k, v in ranges.items()}
    assert spans == {
        "infant": (0, 0, 1),
        "child": (1, 9, 9),
        "adolescent": (10, 19, 10),
        "adult": (20, 64, 45),
        "older adult": (65, 100, 36),
    }


def test_ages_sources_cite_definitions(sets):
    by_id = _by_id(sets["ages"])
    assert "WHO" in by_id["age_000"]["source"]
    for age in (10, 15, 19):
        assert "WHO" in by_id[f"age_{age:03d}"]["source"]
        assert "10-19" in by_id[f"age_{age:03d}"]["source"]
    for age in (65, 80, 100):
        assert "65" in by_id[f"age_{age:03d}"]["source"]


def test_ages_targets(sets):
    items = sets["ages"]["items"]
    by_id = _by_id(sets["ages"])
    assert " infants" in _answers(by_id["age_000"], "stage")
    assert " children" in _answers(by_id["age_005"], "stage")
    assert " adolescents" in _answers(by_id["age_015"], "stage")
    assert " teenagers" in _answers(by_id["age_015"], "stage")
    assert " teenagers" not in _answers(by_id["age_011"], "stage")  # 11 is not a teen
    assert " adults" in _answers(by_id["age_047"], "stage")
    assert " older adults" in _answers(by_id["age_080"], "stage")
    assert _answers(by_id["age_017"], "care")[0] == " pediatrics"
    assert _answers(by_id["age_018"], "care")[0] != " pediatrics"
    assert _answers(by_id["age_070"], "care")[0] == " geriatrics"
    for it in items:
        assert _answers(it, "next_age") == [f" {it['labels']['age'] + 1}"]
    # Stage words may be shared by neighbouring life stages (ages MANY_TO_MANY in
    # test_concepts_audit.py), but only these documented ones, only over these age ranges, and the
    # first answer of each stage is its own: one per stage, accepted by no item of another stage
    # except " children" (MedlinePlus: school-age children 6-12) at 10-12.
    accepted: dict[str, set[int]] = defaultdict(set)
    for it in items:
        for a in _norm(_answers(it, "stage")):
            accepted[a].add(it["labels"]["age"])
    assert accepted["young adults"] == set(range(18, 40))  # 15-17: adolescents, not young adults
    assert accepted["teenagers"] == accepted["teens"] == set(range(13, 20))
    assert accepted["preteens"] == set(range(10, 13))
    assert accepted["children"] == set(range(1, 13))
    assert accepted["newborns"] == accepted["neonates"] == {0}
    assert accepted["centenarians"] == {100}
    first = _answers_by_label(items, "stage", "life_stage")
    firsts = {stage: {ans[0] for ans in lists} for stage, lists in first.items()}
    assert all(len(f) == 1 for f in firsts.values()), firsts
    firsts = {stage: next(iter(f)) for stage, f in firsts.items()}
    assert len(set(firsts.values())) == len(firsts), firsts
    shared_ok = {("child", "adolescent")}  # (stage of the first answer, stage that shares it)
    for stage, word in firsts.items():
        for it in items:
            other = it["labels"]["life_stage"]
            if other != stage and word.strip().casefold() in _norm(_answers(it, "stage")):
                assert (stage, other) in shared_ok and it["labels"]["age"] <= 12, (word, it["id"])
    # words shared across stages are the documented ones only
    by_stage: dict[str, set[str]] = defaultdict(set)
    for it in items:
        by_stage[it["labels"]["life_stage"]] |= _norm(_answers(it, "stage"))
    shared = {w for a, b in itertools.combinations(by_stage, 2) for w in by_stage[a] & by_stage[b]}
    assert shared == {"children", "young adults"}, shared
    # care answers are disjoint between pediatric and the rest
    care = _answers_by_label(items, "care", "care_group")
    assert len(care["pediatric"]) == 1
    ped = _norm(list(next(iter(care["pediatric"]))))
    for group in ("adult", "older adult"):
        for ans in care[group]:
            assert not ped & _norm(list(ans)), group
    for group, answers in care.items():
        assert len(answers) == 1, f"{group}: inconsistent care answers {answers}"


def test_ages_templates_grammatical_for_every_age(sets):
    """No article directly before {concept} ("a 8-year-old"), no gendered age words."""
    texts = list(sets["ages"]["templates"])
    texts += [t["prompt"] for t in sets["ages"]["items"][0]["targets"]]
    for text in texts:
        assert not re.search(r"\b(a|an|A|An) \{concept\}", text), text
        assert not re.search(r"\b(woman|man|girl|boy)\b", text), text


# ---------------------------------------------------------------------------- controls


@pytest.mark.parametrize("name", list(CONTROLS))
def test_control_header(sets, name):
    data = sets[name]
    assert data["medical"] is False
    assert data["family"] == "control"
    assert data["control_for"] == CONTROLS[name]
    assert data["control_for"] in MEDICAL_FAMILIES
    assert 60 <= len(data["items"]) <= 121
    categorical = [k for k, v in data["labels"].items() if v["kind"] == "categorical"]
    assert categorical
    groups = Counter(it["labels"][categorical[0]] for it in data["items"])
    assert len(groups) >= 4, groups


CAPITALS = {
    "france": " Paris",
    "germany": " Berlin",
    "japan": " Tokyo",
    "australia": " Canberra",
    "canada": " Ottawa",
    "brazil": " Brasília",
    "turkey": " Ankara",
    "nigeria": " Abuja",
    "egypt": " Cairo",
    "switzerland": " Bern",
    "united_states": " Washington",
    "india": " New Delhi",
    "kenya": " Nairobi",
    "myanmar": " Naypyidaw",
    "tanzania": " Dodoma",
    "new_zealand": " Wellington",
    "peru": " Lima",
    "netherlands": " Amsterdam",
}
CONTINENTS = {
    "france": ("Europe", " Europe"),
    "japan": ("Asia", " Asia"),
    "australia": ("Oceania", " Oceania"),
    "canada": ("Americas", " North America"),
    "brazil": ("Americas", " South America"),
    "argentina": ("Americas", " South America"),
    "nigeria": ("Africa", " Africa"),
    "egypt": ("Africa", " Africa"),
    "kenya": ("Africa", " Africa"),
    "india": ("Asia", " Asia"),
    "saudi_arabia": ("Asia", " Asia"),
    "russia": ("Europe", " Europe"),
    "fiji": ("Oceania", " Oceania"),
    "mexico": ("Americas", " North America"),
}
ISO3 = {"germany": "DEU", "united_kingdom": "GBR", "switzerland": "CHE", "south_africa": "ZAF"}


def test_countries(sets):
    data = sets["countries"]
    items = data["items"]
    by_id = _by_id(data)
    assert len(items) >= 80
    for cid, capital in CAPITALS.items():
        assert capital in _answers(by_id[cid], "capital"), cid
    for cid, (region, answer) in CONTINENTS.items():
        assert by_id[cid]["labels"]["continent"] == region, cid
        assert answer in _answers(by_id[cid], "continent"), cid
    for cid, code in ISO3.items():
        assert by_id[cid]["labels"]["iso3"] == code
    # both capitals of countries with split capitals
    assert {" Sucre", " La Paz"} <= set(_answers(by_id["bolivia"], "capital"))
    assert {" Pretoria", " Cape Town"} <= set(_answers(by_id["south_africa"], "capital"))
    # no country shares a capital with another
    capitals = [_norm(_answers(it, "capital")) for it in items]
    assert all(not a & b for a, b in itertools.combinations(capitals, 2))
    regions = Counter(it["labels"]["continent"] for it in items)
    assert set(regions) == {"Africa", "Americas", "Asia", "Europe", "Oceania"}
    iso = [it["labels"]["iso3"] for it in items]
    assert all(re.fullmatch(r"[A-Z]{3}", c) for c in iso) and len(set(iso)) == len(iso)
    for it in items:
        assert "M49" in it["source"] and it["labels"]["iso3"] in it["source"], it["id"]
        assert not re.match(r"^(a|an|the) ", it["concept"]) or it["concept"].startswith("the ")


ANIMAL_CLASSES = {
    "whale": "mammal",
    "dolphin": "mammal",
    "fruit_bat": "mammal",
    "platypus": "mammal",
    "seal": "mammal",
    "penguin": "bird",
    "ostrich": "bird",
    "crocodile": "reptile",
    "tortoise": "reptile",
    "python": "reptile",
    "frog": "amphibian",
    "salamander": "amphibian",
    "axolotl": "amphibian",
    "shark": "fish",
    "seahorse": "fish",
    "stingray": "fish",
    "bee": "insect",
    "spider": "arachnid",
    "scorpion": "arachnid",
    "crab": "crustacean",
}
ANIMAL_DIETS = {
    "lion": "carnivore",
    "cow": "herbivore",
    "koala": "herbivore",
    "pig": "omnivore",
    "chimpanzee": "omnivore",
    "polar_bear": "carnivore",
    "penguin": "carnivore",
    "goose": "herbivore",
    "iguana": "herbivore",
    "shark": "carnivore",
}


def test_animals(sets):
    data = sets["animals"]
    items = data["items"]
    by_id = _by_id(data)
    assert len(items) >= 80
    for aid, cls in ANIMAL_CLASSES.items():
        assert by_id[aid]["labels"]["class"] == cls, aid
        assert f" {cls}" in _answers(by_id[aid], "class"), aid
    for aid, diet in ANIMAL_DIETS.items():
        assert by_id[aid]["labels"]["diet"] == diet, aid
    diet_words = {
        "herbivore": " herbivorous",
        "carnivore": " carnivorous",
        "omnivore": " omnivorous",
    }
    for it in items:
        assert _answers(it, "diet")[0] == diet_words[it["labels"]["diet"]], it["id"]
    assert set(Counter(it["labels"]["diet"] for it in items)) == set(diet_words)
    assert len(Counter(it["labels"]["class"] for it in items)) >= 6
    # class and diet cross: most classes hold more than one diet
    diets_per_class = defaultdict(set)
    for it in items:
        diets_per_class[it["labels"]["class"]].add(it["labels"]["diet"])
    assert sum(len(d) > 1 for d in diets_per_class.values()) >= 4
    for target_id, label in (("class", "class"), ("diet", "diet")):
        groups = _answers_by_label(items, target_id, label)
        assert all(len(v) == 1 for v in groups.values()), groups
        _groups_disjoint(groups)


ISCO_MAJOR = {
    "0": "Armed forces occupations",
    "1": "Managers",
    "2": "Professionals",
    "3": "Technicians and associate professionals",
    "4": "Clerical support workers",
    "5": "Service and sales workers",
    "6": "Skilled agricultural, forestry and fishery workers",
    "7": "Craft and related trades workers",
    "8": "Plant and machine operators, and assemblers",
    "9": "Elementary occupations",
}
ISCO_SPOT = {
    "plumber": "7126",
    "electrician": "7411",
    "carpenter": "7115",
    "accountant": "2411",
    "lawyer": "2611",
    "judge": "2612",
    "chef": "3434",
    "cook": "5120",
    "waiter": "5131",
    "police_officer": "5412",
    "firefighter": "5411",
    "software_developer": "2512",
    "truck_driver": "8332",
    "soldier": "0310",
}
# health occupations (ISCO-08 sub-major groups 22 and 32, psychologists/counsellors, personal
# care workers in health services) must not appear in a non-medical control set
HEALTH_CODE = re.compile(r"^(22|32|263[45]|532)")
HEALTH_WORDS = re.compile(r"nurse|doctor|physician|surgeon|dentist|pharmacist|paramedic|medic")


def test_occupations(sets):
    data = sets["occupations"]
    items = data["items"]
    by_id = _by_id(data)
    assert len(items) >= 80
    for it in items:
        code = it["labels"]["isco08"]
        assert re.fullmatch(r"[0-9]|[0-9]{4}", code), (it["id"], code)
        assert it["labels"]["sector"] == ISCO_MAJOR[code[0]], it["id"]
        assert not HEALTH_CODE.match(code), it["id"]
        assert not HEALTH_WORDS.search(it["concept"].lower()), it["id"]
        assert "ISCO-08" in it["source"] and code in it["source"], it["id"]
    for oid, code in ISCO_SPOT.items():
        assert by_id[oid]["labels"]["isco08"] == code, oid
    assert len(Counter(it["labels"]["sector"] for it in items)) == 10
    groups = _answers_by_label(items, "workplace", "workplace")
    assert all(len(v) == 1 for v in groups.values()), "workplace answers vary within a group"
    _groups_disjoint(groups)
    assert " construction" in _answers(by_id["bricklayer"], "workplace")
    assert " schools" in _answers(by_id["primary_school_teacher"], "workplace")
    assert " agriculture" in _answers(by_id["dairy_farmer"], "workplace")


PRESIDENTS = {
    1900: " William McKinley",
    1905: " Theodore Roosevelt",
    1917: " Woodrow Wilson",
    1927: " Calvin Coolidge",
    1941: " Franklin D. Roosevelt",
    1950: " Harry S. Truman",
    1962: " John F. Kennedy",
    1972: " Richard Nixon",
    1985: " Ronald Reagan",
    1999: " Bill Clinton",
}


def test_years(sets):
    data = sets["years"]
    items = data["items"]
    assert len(items) == 101
    assert [it["labels"]["year"] for it in items] == list(range(1900, 2001))
    by_id = _by_id(data)
    for it in items:
        y = it["labels"]["year"]
        assert it["id"] == f"year_{y}"
        assert it["concept"] == str(y)
        assert it["labels"]["decade"] == f"{y // 10 * 10}s"
        assert f" {y // 10 * 10}s" in _answers(it, "decade")
        assert _answers(it, "next_year") == [f" {y + 1}"]
    assert _answers(by_id["year_1947"], "decade")[0] == " forties"
    eras = {1913: "pre-World War I", 1914: "World War I", 1918: "World War I"}
    eras |= {1919: "interwar period", 1939: "World War II", 1945: "World War II"}
    eras |= {1946: "post-war and Cold War", 1991: "post-war and Cold War", 1992: "post-Cold War"}
    for y, era in eras.items():
        assert by_id[f"year_{y}"]["labels"]["era"] == era, y
    for y, president in PRESIDENTS.items():
        assert _answers(by_id[f"year_{y}"], "president")[0] == president, y
    # a year in which the office changed hands accepts both presidents
    assert {" Franklin D. Roosevelt", " Harry S. Truman"} <= set(
        _answers(by_id["year_1945"], "president")
    )
    assert {" John F. Kennedy", " Lyndon B. Johnson"} <= set(
        _answers(by_id["year_1963"], "president")
    )
    _groups_disjoint(_answers_by_label(items, "decade", "decade"))


# ---------------------------------------------------------------------------- loader


@pytest.mark.parametrize("name", ALL_SETS)
def test_loads_through_medmap_loader(sets, name):
    """The bundled files load through the package loader with every item intact."""
    from medmap.concepts import load_concepts

    loaded = load_concepts(name)
    assert loaded.name == name
    assert loaded.family == sets[name]["family"]
    assert loaded.medical is sets[name]["medical"]
    assert loaded.control_for == sets[name]["control_for"]
    assert [it.id for it in loaded.items] == [it["id"] for it in sets[name]["items"]]
    assert len(loaded.templates) == len(sets[name]["templates"])
