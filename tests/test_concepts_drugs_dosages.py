"""Content checks for the bundled `drugs` and `dosages` concept sets.

The files are read with ``yaml.safe_load`` and checked against the concept-file contract
(docs/concept-format.md) plus domain rules: WHO ATC code syntax and ATC group consistency,
spot checks against the WHO ATC/DDD Index, specialty and mechanism labels that cross (so
"drugs cluster by specialty rather than mechanism" is testable), and dose levels that rise
monotonically per drug with a consistent usual dose and dose ratio.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml

DATA = Path(__file__).resolve().parents[1] / "src" / "medmap" / "concepts" / "data"

ATC_RE = re.compile(r"^[A-Z]\d{2}[A-Z]{2}\d{2}$")
ID_RE = re.compile(r"^[a-z0-9_]+$")
PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
LEVELS = ["sub-therapeutic", "usual", "high", "toxic"]
NAMES = ("drugs", "dosages")
# concept name -> WHO ATC substance name where they differ
SYNONYMS = {
    "aspirin": "acetylsalicylic acid",
    "epoetin alfa": "erythropoietin",
    "mycophenolate mofetil": "mycophenolic acid",
}


def _load(name: str) -> dict:
    with open(DATA / f"{name}.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def sets() -> dict[str, dict]:
    return {name: _load(name) for name in NAMES}


def _check_text(text: str, label_names: set[str], where: str) -> None:
    names = PLACEHOLDER_RE.findall(text)
    assert names.count("concept") == 1, f"{where}: {{concept}} must occur exactly once: {text!r}"
    extra = set(names) - {"concept"} - label_names
    assert not extra, f"{where}: unknown placeholders {extra} in {text!r}"


def _answer_sets(items: list[dict], target_id: str) -> list[tuple[str, frozenset[str]]]:
    return [
        (it["id"], frozenset(t["answers"]))
        for it in items
        for t in it["targets"]
        if t["id"] == target_id
    ]


def _pairs(items: list[dict], target_id: str) -> int:
    """Number of counterfactual pairs: items sharing `target_id` with disjoint answers."""
    answers = [a for _, a in _answer_sets(items, target_id)]
    return sum(1 for a, b in itertools.combinations(answers, 2) if not a & b)


def _variants(answers) -> set[str]:
    """Spelling-insensitive keys of the answers (UK/US spelling, hyphens, plurals, articles)."""
    from test_concepts_audit import _variant

    return {_variant(a) for a in answers}


@pytest.mark.parametrize("name", NAMES)
def test_contract(sets, name):
    data = sets[name]
    assert data["name"] == name
    assert data["family"] == name
    assert data["medical"] is True
    assert isinstance(data["version"], int)
    assert data["control_for"] is None
    labels = data["labels"]
    label_names = set(labels)
    assert len(data["templates"]) >= 5
    for i, tpl in enumerate(data["templates"]):
        _check_text(tpl, label_names, f"{name} template {i}")
    ids, concepts = Counter(), Counter()
    prompts: dict[str, set[str]] = defaultdict(set)
    for row, item in enumerate(data["items"]):
        where = f"{name} item {row} ({item.get('id')})"
        assert ID_RE.match(item["id"]), where
        ids[item["id"]] += 1
        assert item["concept"] == item["concept"].strip() and item["concept"], where
        concepts[item["concept"].lower()] += 1
        assert set(item["labels"]) == label_names, where
        for lname, spec in labels.items():
            value = item["labels"][lname]
            if spec.get("order"):
                assert value in spec["order"], (where, lname, value)
            elif spec["kind"] in ("ordinal", "numeric"):
                assert isinstance(value, int | float) and not isinstance(value, bool), where
            else:
                assert isinstance(value, str) and value.strip(), where
        assert isinstance(item["source"], str) and item["source"].strip(), where
        assert item["targets"], f"{where}: needs >= 1 target"
        for tgt in item["targets"]:
            assert ID_RE.match(tgt["id"]), where
            _check_text(tgt["prompt"], label_names, where)
            prompts[tgt["id"]].add(tgt["prompt"])
            assert tgt["answers"], where
            for ans in tgt["answers"]:
                assert isinstance(ans, str) and ans.startswith(" ") and ans.strip(), (where, ans)
                assert ans == ans.rstrip(), (where, ans)
            assert len(set(tgt["answers"])) == len(tgt["answers"]), f"{where}: duplicate answers"
        tgt_ids = [t["id"] for t in item["targets"]]
        assert len(set(tgt_ids)) == len(tgt_ids), f"{where}: duplicate target ids"
    assert not [k for k, v in ids.items() if v > 1], "duplicate ids"
    assert not [k for k, v in concepts.items() if v > 1], "duplicate concepts"
    # counterfactual pairs need one prompt text per target id
    assert all(len(p) == 1 for p in prompts.values()), prompts


def test_drugs_atc(sets):
    items = sets["drugs"]["items"]
    assert len(items) >= 150
    assert sets["drugs"]["labels"]["atc_code"]["kind"] == "identifier"
    codes = Counter(it["labels"]["atc_code"] for it in items)
    assert not [c for c, n in codes.items() if n > 1], "an ATC code is used twice"
    group_of: dict[str, set[str]] = defaultdict(set)
    for it in items:
        code = it["labels"]["atc_code"]
        group = it["labels"]["atc_group"]
        assert ATC_RE.match(code), (it["id"], code)
        assert group.startswith(code[:4] + " ") and len(group) > 5, (it["id"], code, group)
        group_of[code[:4]].add(group)
        # the source cites the code with its ATC substance name, which names this drug
        m = re.search(rf"WHO ATC/DDD Index 2025: {code} \(([^)]+(?:\([^)]*\))?)\)", it["source"])
        assert m, (it["id"], it["source"])
        atc_name = SYNONYMS.get(it["concept"], it["concept"])
        assert m.group(1).startswith(atc_name), (it["id"], m.group(1))
    assert all(len(g) == 1 for g in group_of.values()), "one name per ATC group code"
    # spot checks against the WHO ATC/DDD Index 2025
    by_concept = {it["concept"]: it["labels"] for it in items}
    expected = {
        "metformin": "A10BA02",
        "atorvastatin": "C10AA05",
        "metoprolol": "C07AB02",
        "timolol": "S01ED01",
        "propranolol": "C07AA05",
        "omeprazole": "A02BC01",
        "sertraline": "N06AB06",
        "amlodipine": "C08CA01",
        "ramipril": "C09AA05",
        "furosemide": "C03CA01",
        "salbutamol": "R03AC02",
        "levothyroxine": "H03AA01",
        "amoxicillin": "J01CA04",
        "prednisolone": "H02AB06",
        "methotrexate": "L04AX03",
        "tamoxifen": "L02BA01",
        "haloperidol": "N05AD01",
        "lithium": "N05AN01",
        "acetazolamide": "S01EC01",
        "aspirin": "B01AC06",
        "latanoprost": "S01EE01",
        "tamsulosin": "G04CA02",
    }
    for concept, code in expected.items():
        assert by_concept[concept]["atc_code"] == code, concept
    assert by_concept["metoprolol"]["atc_group"] == "C07A beta blocking agents"
    assert by_concept["timolol"]["atc_group"].startswith("S01E antiglaucoma")
    assert by_concept["sertraline"]["atc_group"] == "N06A antidepressants"
    assert by_concept["acetazolamide"]["atc_group"].startswith(
        "S01E "
    )  # ATC files it as ophthalmic


def test_drugs_specialty_and_mechanism_cross(sets):
    items = sets["drugs"]["items"]
    spec_of_mech: dict[str, set[str]] = defaultdict(set)
    mech_of_spec: dict[str, set[str]] = defaultdict(set)
    n_spec = Counter()
    for it in items:
        s, m = it["labels"]["specialty"], it["labels"]["mechanism"]
        spec_of_mech[m].add(s)
        mech_of_spec[s].add(m)
        n_spec[s] += 1
    crossing = {m for m, s in spec_of_mech.items() if len(s) >= 2}
    assert len(crossing) >= 10, sorted(crossing)
    big = [s for s, n in n_spec.items() if n >= 10]
    assert len(big) >= 8, n_spec
    assert sum(1 for s in mech_of_spec if len(mech_of_spec[s]) >= 3) >= 8, mech_of_spec
    # every large specialty mixes several mechanisms, at least one of them shared
    for s in big:
        assert len(mech_of_spec[s]) >= 3, s
        assert mech_of_spec[s] & crossing, s
    # the named examples of the design
    beta = spec_of_mech["beta-adrenergic antagonist"]
    assert {"cardiology", "neurology", "ophthalmology"} <= beta, beta
    assert len(spec_of_mech["glucocorticoid receptor agonist"]) >= 5
    assert {"cardiology", "neurology"} <= spec_of_mech["L-type calcium channel blocker"]
    assert {"neurology", "ophthalmology"} <= spec_of_mech["carbonic anhydrase inhibitor"]
    assert {"neurology", "psychiatry"} <= spec_of_mech["voltage-gated sodium channel blocker"]
    assert {"rheumatology", "infectious disease"} <= spec_of_mech[
        "dihydrofolate reductase inhibitor"
    ]
    by_concept = {it["concept"]: it["labels"] for it in items}
    assert by_concept["propranolol"]["specialty"] == "neurology"
    assert by_concept["timolol"]["specialty"] == "ophthalmology"
    assert by_concept["lamotrigine"]["specialty"] == "psychiatry"
    assert by_concept["methotrexate"]["specialty"] == "rheumatology"
    assert by_concept["sertraline"]["mechanism"] == "selective serotonin reuptake inhibitor"


def test_drugs_targets(sets):
    items = sets["drugs"]["items"]
    for it in items:
        assert {t["id"] for t in it["targets"]} <= {"class", "treats"}, it["id"]
    # A drug has several classes (aspirin: antiplatelet and NSAID), so class lists may overlap
    # without being identical (drugs/class is in MANY_TO_MANY of test_concepts_audit.py). What
    # must hold: items the pair builder pairs (disjoint lists) never name one class in another
    # spelling, and a shared class does not drag in the other drug's other classes (spot
    # checks at the end).
    for target_id in ("class", "treats"):
        rows = _answer_sets(items, target_id)
        same_word = [
            (i, j, sorted(_variants(a) & _variants(b)))
            for (i, a), (j, b) in itertools.combinations(rows, 2)
            if not {x.casefold() for x in a} & {x.casefold() for x in b}
            and _variants(a) & _variants(b)
        ]
        assert not same_word, f"{target_id}: paired lists share a spelling variant: {same_word[:5]}"
    assert sum(1 for it in items if len(it["targets"]) == 2) >= 0.9 * len(items)
    assert _pairs(items, "class") > 5000
    assert _pairs(items, "treats") > 5000
    by_concept = {it["concept"]: {t["id"]: t["answers"] for t in it["targets"]} for it in items}
    assert " beta blockers" in by_concept["timolol"]["class"]
    assert by_concept["timolol"]["class"] == by_concept["propranolol"]["class"]
    assert " glaucoma" in by_concept["timolol"]["treats"]
    assert " migraine" in by_concept["propranolol"]["treats"]
    assert " type 2 diabetes" in by_concept["metformin"]["treats"]
    assert " statins" in by_concept["atorvastatin"]["class"]
    assert " SSRIs" in by_concept["sertraline"]["class"]
    aza, tac = by_concept["azathioprine"]["class"], by_concept["tacrolimus"]["class"]
    assert " immunosuppressants" in aza and " immunosuppressants" in tac
    assert any("thiopurine" in a for a in aza) and not any("thiopurine" in a for a in tac)
    assert (
        " NSAIDs" in by_concept["aspirin"]["class"]
        and " NSAIDs" in by_concept["celecoxib"]["class"]
    )
    assert not any("antiplatelet" in a for a in by_concept["celecoxib"]["class"])


def test_dosages(sets):
    data = sets["dosages"]
    assert data["labels"]["dose_level"] == {"kind": "ordinal", "order": LEVELS}
    items = data["items"]
    assert len(items) >= 120
    by_drug: dict[str, list[dict]] = defaultdict(list)
    for it in items:  # file order
        by_drug[it["labels"]["drug"]].append(it)
    assert len(by_drug) >= 30
    for drug, rows in by_drug.items():
        lab = [r["labels"] for r in rows]
        assert [x["dose_level"] for x in lab] == LEVELS, drug
        assert [x["dose_level_index"] for x in lab] == [1, 2, 3, 4], drug
        amounts = [x["amount_mg"] for x in lab]
        assert all(a < b for a, b in itertools.pairwise(amounts)), (drug, amounts)
        assert len({x["usual_dose_mg"] for x in lab}) == 1, drug
        usual = lab[1]["usual_dose_mg"]
        assert lab[1]["amount_mg"] == usual, drug
        for r in rows:
            x = r["labels"]
            assert x["dose_ratio"] == pytest.approx(x["amount_mg"] / usual, rel=1e-3), r["id"]
            # units may differ within a drug; the written amount is the same dose in mg
            number, unit = r["concept"].split(" of ")[0].split()
            assert unit == x["unit"], r["id"]
            assert r["concept"] == f"{number} {unit} of {drug}", r["id"]
            assert float(number) * UNIT_MG[unit] == pytest.approx(x["amount_mg"], rel=1e-9), r["id"]
            assert _id_amount_mg(r["id"], drug) == pytest.approx(x["amount_mg"], rel=1e-9), r["id"]
            assert _clinical_unit(x["amount_mg"], unit), (r["id"], r["concept"])
        assert lab[0]["dose_ratio"] <= 0.25, drug
        assert 1 < lab[2]["dose_ratio"] <= 10, drug
        assert lab[3]["dose_ratio"] >= 5, drug
        assert len({r["source"] for r in rows}) == 1, f"{drug}: one source per drug"
    units = Counter(it["labels"]["unit"] for it in items)
    assert set(units) == {"mg", "µg", "g"}, units
    # safety answers: one list per level, disjoint between levels
    level_answers: dict[str, set[frozenset[str]]] = defaultdict(set)
    for it in items:
        for t in it["targets"]:
            assert t["id"] == "safety", it["id"]
            level_answers[it["labels"]["dose_level"]].add(frozenset(t["answers"]))
    assert all(len(v) == 1 for v in level_answers.values()), level_answers
    flat = {lvl: next(iter(v)) for lvl, v in level_answers.items()}
    for a, b in itertools.combinations(LEVELS, 2):
        assert not flat[a] & flat[b], (a, b)
    assert " toxic" in flat["toxic"] and " a normal dose" in flat["usual"]
    assert _pairs(items, "safety") > 5000
    # spot checks of medically anchored values, in mg and as written
    lab = {(it["labels"]["drug"], it["labels"]["dose_level"]): it for it in items}
    mg = {k: v["labels"]["amount_mg"] for k, v in lab.items()}
    assert mg[("paracetamol", "usual")] == 1000
    assert mg[("paracetamol", "toxic")] >= 150 * 70  # >= 150 mg/kg at 70 kg
    assert mg[("metformin", "usual")] == 500
    assert mg[("digoxin", "usual")] == 0.25
    assert mg[("digoxin", "toxic")] >= 10  # > 10 mg acute ingestion
    assert mg[("lithium carbonate", "usual")] == 400
    written = {k: v["concept"] for k, v in lab.items()}
    assert written[("paracetamol", "toxic")] == "15 g of paracetamol"
    assert written[("metformin", "toxic")] == "30 g of metformin"
    assert written[("digoxin", "usual")] == "250 µg of digoxin"
    assert written[("colchicine", "usual")] == "500 µg of colchicine"
    assert written[("ibuprofen", "usual")] == "400 mg of ibuprofen"


UNIT_MG = {"g": 1000.0, "mg": 1.0, "µg": 1e-3}


def _id_amount_mg(item_id: str, drug: str) -> float:
    """The amount in the item id (kept from the one-unit version 2 table: "digoxin_25ug",
    "dosulepin_7_5mg") in mg: the unit change left every dose value as it was."""
    m = re.fullmatch(re.escape(drug.replace(" ", "_")) + r"_(\d+(?:_\d+)?)(mg|ug)", item_id)
    assert m, item_id
    return float(m.group(1).replace("_", ".")) * (1.0 if m.group(2) == "mg" else 1e-3)


def _clinical_unit(amount_mg: float, unit: str) -> bool:
    """The unit is one clinicians write for that amount: grams only from 1 g (an overdose is
    "15 g", not "15000 mg"; 10 g and more only in grams), micrograms only below 1 mg ("250 µg
    of digoxin"), milligrams from 0.05 mg up to below 10 g ("0.5 mg", "1000 mg")."""
    if unit == "g":
        return amount_mg >= 1000
    if unit == "µg":
        return amount_mg < 1
    return 0.05 <= amount_mg < 10000


@pytest.mark.parametrize("name", NAMES)
def test_loads_through_medmap_loader(sets, name):
    """The bundled files load through the package loader with every item intact."""
    from medmap.concepts import load_concepts

    loaded = load_concepts(name)
    assert loaded.name == name
    assert [it.id for it in loaded.items] == [it["id"] for it in sets[name]["items"]]
    assert len(loaded.templates) == len(sets[name]["templates"])


# Specialties whose drugs all sit in one ATC anatomical main group (first letter), so the label
# and the code must agree: S sensory organs, N nervous system, J/P anti-infectives/antiparasitics.
UNAMBIGUOUS_ATC_GROUP = {
    "ophthalmology": {"S"},
    "psychiatry": {"N"},
    "infectious disease": {"J", "P"},
}


def test_atc_first_letter_agrees_with_unambiguous_specialty():
    from medmap.concepts import load_concepts

    cs = load_concepts("drugs")
    seen = set()
    for it in cs.items:
        spec, code = it.labels["specialty"], it.labels["atc_code"]
        if spec in UNAMBIGUOUS_ATC_GROUP:
            seen.add(spec)
            assert code[0] in UNAMBIGUOUS_ATC_GROUP[spec], (it.id, spec, code)
        # the first letter of the ATC group label is the code's anatomical group
        assert it.labels["atc_group"][0] == code[0], it.id
    assert seen == set(UNAMBIGUOUS_ATC_GROUP)
