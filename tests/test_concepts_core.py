"""The concept library core: schema rules, rendering, subsets, counterfactual pairs, user files,
CLI and ``knows`` (checked against a plain transformers forward pass)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from medmap.cli import main
from medmap.concepts import (
    ConceptSet,
    counterfactual_pairs,
    list_concepts,
    load_concepts,
    load_file,
    pair_survival,
)
from medmap.concepts.schema import render_template
from medmap.errors import ConceptFileError

GOOD_YAML = """\
name: mini
version: 1
family: drugs
medical: true
labels:
  cls: {kind: categorical}
  dose: {kind: ordinal, order: [low, high]}
templates:
  - "The patient takes {concept} daily."
  - "{concept} was prescribed ({cls})."
items:
  - id: metformin
    concept: metformin
    labels: {cls: biguanide, dose: low}
    source: "WHO ATC A10BA02"
    targets:
      - {id: treats, prompt: "{concept} is used to treat", answers: [" diabetes"]}
  - id: atorvastatin
    concept: atorvastatin
    labels: {cls: statin, dose: high}
    source: "WHO ATC C10AA05"
    targets:
      - {id: treats, prompt: "{concept} is used to treat", answers: [" high cholesterol"]}
  - id: simvastatin
    concept: simvastatin
    labels: {cls: statin, dose: low}
    source: "WHO ATC C10AA01"
    targets:
      - {id: treats, prompt: "{concept} is used to treat", answers: [" high cholesterol"]}
"""


def write(tmp_path, name, text, mode="w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(text)
    else:
        p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def test_good_file_renders_spans_and_labels(tmp_path):
    cs = load_file(write(tmp_path, "mini.yaml", GOOD_YAML))
    assert cs.name == "mini" and len(cs) == 3
    prompts = list(cs.render())
    assert len(prompts) == 6
    for p in prompts:
        a, b = p.span
        concept = cs.items[p.item_index].concept
        assert p.text[a:b].lower() == concept
    # a concept that opens the prompt is capitalised; label placeholders are filled
    second = [p for p in prompts if p.template_index == 1]
    assert second[0].text == "Metformin was prescribed (biguanide)."
    assert second[0].span == (0, len("metformin"))
    assert cs.label_values("dose") == [1.0, 2.0, 1.0]
    assert cs.label_values("cls") == ["biguanide", "statin", "statin"]
    t = list(cs.targets())
    assert [x.prompt for x in t][0] == "Metformin is used to treat"
    assert t[1].answers == (" high cholesterol",)


def test_render_template_escaped_braces():
    text, span = render_template("Dose {{mg}} of {concept}.", "aspirin", {})
    assert text == "Dose {mg} of aspirin."
    assert text[span[0] : span[1]] == "aspirin"


def test_counterfactual_pairs_need_disjoint_answers(tmp_path):
    cs = load_file(write(tmp_path, "mini.yaml", GOOD_YAML))
    pairs = list(counterfactual_pairs(cs))
    got = {(p.clean.item_id, p.corrupt.item_id) for p in pairs}
    # the two statins share their answer, so they never pair with each other
    assert got == {
        ("metformin", "atorvastatin"),
        ("atorvastatin", "metformin"),
        ("metformin", "simvastatin"),
        ("simvastatin", "metformin"),
    }
    for p in pairs:
        a, b = p.clean.span, p.corrupt.span
        assert p.clean.prompt[: a[0]] == p.corrupt.prompt[: b[0]]
        assert p.clean.prompt[a[1] :] == p.corrupt.prompt[b[1] :]
        assert p.clean_answer != p.corrupt_answer
    assert len(list(counterfactual_pairs(cs, max_pairs=2))) == 2
    assert [(p.clean.item_id, p.corrupt.item_id) for p in counterfactual_pairs(cs, seed=3)] == [
        (p.clean.item_id, p.corrupt.item_id) for p in counterfactual_pairs(cs, seed=3)
    ]


@pytest.mark.parametrize("name", ["diseases", "symptoms", "progression"])
def test_bundled_pairs_differ_only_in_span_and_tokenize_equal(name):
    from tiny import tokenizer

    tok = tokenizer()
    cs = load_concepts(name)
    pairs = list(counterfactual_pairs(cs, tok, max_pairs=40, seed=1))
    assert pairs, name
    for p in pairs:
        a, b = p.clean.span, p.corrupt.span
        assert p.clean.prompt[: a[0]] == p.corrupt.prompt[: b[0]]
        assert p.clean.prompt[a[1] :] == p.corrupt.prompt[b[1] :]
        ids_a = tok(p.clean.prompt)["input_ids"]
        ids_b = tok(p.corrupt.prompt)["input_ids"]
        assert len(ids_a) == len(ids_b)
        assert not {x.strip().lower() for x in p.clean.answers} & {
            x.strip().lower() for x in p.corrupt.answers
        }
    s = pair_survival(cs, tok)
    assert 0 < s["same_length"] < s["candidates"]


def test_subset_is_stratified_deterministic_and_keeps_series():
    cs = load_concepts("diseases")
    sub = cs.subset(40, seed=0)
    assert len(sub) == 40
    assert [it.id for it in sub.items] == [it.id for it in cs.subset(40, seed=0).items]
    assert [it.id for it in sub.items] != [it.id for it in cs.subset(40, seed=1).items]
    # original order kept; every chapter with >= 1/40 of the items is represented
    index = {it.id: i for i, it in enumerate(cs.items)}
    assert [index[it.id] for it in sub.items] == sorted(index[it.id] for it in sub.items)
    from collections import Counter

    full = Counter(cs.label_values("icd10_chapter"))
    got = Counter(sub.label_values("icd10_chapter"))
    for ch, n in full.items():
        assert abs(got[ch] - 40 * n / len(cs)) < 1.0 + 1e-9, ch
    prog = load_concepts("progression")
    psub = prog.subset(20, seed=0)
    series = Counter(psub.label_values("series"))
    full_series = Counter(prog.label_values("series"))
    assert all(series[s] == full_series[s] for s in series)  # whole series only
    assert sum(series.values()) <= 20


def test_list_concepts_and_unknown_name():
    names = list_concepts()
    assert {"diseases", "symptoms", "progression"} <= set(names)
    assert names.index("diseases") < names.index("progression")
    with pytest.raises(ConceptFileError, match="unknown concept set 'nonsense'.*bundled sets"):
        load_concepts("nonsense")
    assert isinstance(load_concepts("diseases"), ConceptSet)


# ---- malformed user files: each error names the file, the line/row and the field ----------

BAD_YAML = {
    "invalid_yaml": (GOOD_YAML.replace("labels:\n  cls", "labels:\n cls: [\n  cls"), r"line \d+"),
    "no_marker": (
        GOOD_YAML.replace('"The patient takes {concept} daily."', '"The patient takes it."'),
        r"concept marker \{concept\} exactly once",
    ),
    "two_markers": (
        GOOD_YAML.replace('"The patient takes {concept} daily."', '"{concept} and {concept}."'),
        r"exactly once \(found 2\)",
    ),
    "unknown_placeholder": (
        GOOD_YAML.replace("daily.", "{frequency}."),
        r"\{frequency\}, which is not a label",
    ),
    "duplicate_id": (
        GOOD_YAML.replace("id: simvastatin", "id: atorvastatin"),
        r"line 24: .*duplicate item id",
    ),
    "duplicate_concept": (
        GOOD_YAML.replace("concept: simvastatin", "concept: Atorvastatin"),
        r"line 24: .*duplicate concept",
    ),
    "missing_label": (
        GOOD_YAML.replace("{cls: statin, dose: high}", "{cls: statin}"),
        r"line 18: .*label 'dose' is missing",
    ),
    "ordinal_not_in_order": (
        GOOD_YAML.replace("dose: high}", "dose: extreme}"),
        r"line 18: .*'extreme' is not in its order",
    ),
    "no_source": (
        GOOD_YAML.replace('source: "WHO ATC C10AA05"', 'source: ""'),
        r"line 18: .*'source' is empty",
    ),
    "no_answers": (
        GOOD_YAML.replace('answers: [" diabetes"]', "answers: []"),
        r"line 12: field 'targets.0.answers'",
    ),
    "target_without_marker": (
        GOOD_YAML.replace(
            '"{concept} is used to treat", answers: [" diabetes"]',
            '"It treats", answers: [" diabetes"]',
        ),
        r"line 12: .*target 'treats'.*exactly once",
    ),
    "unknown_field": (
        GOOD_YAML.replace('    source: "WHO ATC A10BA02"', "    sauce: x"),
        r"line 12: field 'sauce': unknown field",
    ),
    "bad_id": (GOOD_YAML.replace("id: metformin\n", "id: Met Formin\n"), r"line 12: field 'id'"),
    "empty_items": (GOOD_YAML.split("items:")[0] + "items: []\n", "has no items"),
    "not_a_mapping": ("- just\n- a list\n", "must be a mapping"),
    "wrong_family": (GOOD_YAML.replace("family: drugs", "family: pharma"), r"field 'family'"),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_malformed_yaml(tmp_path, case):
    text, pattern = BAD_YAML[case]
    p = tmp_path / f"{case}.yaml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConceptFileError, match=pattern) as e:
        load_file(p)
    assert str(p) in str(e.value)
    assert main(["concepts", "validate", str(p)]) == 2


def test_progression_stage_order_broken(tmp_path):
    text = """\
    name: prog
    version: 1
    family: progression
    medical: true
    labels: {series: {kind: categorical}, stage: {kind: ordinal}}
    templates: ["The patient has {concept}."]
    items:
      - {id: a1, concept: "stage 1 x", labels: {series: x, stage: 1}, source: s}
      - {id: a3, concept: "stage 3 x", labels: {series: x, stage: 3}, source: s}
      - {id: a2, concept: "stage 2 x", labels: {series: x, stage: 2}, source: s}
    """
    p = write(tmp_path, "prog.yaml", text)
    with pytest.raises(ConceptFileError, match=r"line 10: .*stage order broken in series 'x'"):
        load_file(p)


GOOD_CSV = """\
id,concept,source,label:cls,label:level,target:treats,answers:treats,template
,,,,,,,"A patient was started on {concept}."
metformin,metformin,ATC A10BA02,biguanide,1,{concept} is used to treat, diabetes|,
atorvastatin,atorvastatin,ATC C10AA05,statin,2,{concept} is used to treat, high cholesterol,
"""


def test_csv_user_file(tmp_path):
    cs = load_file(write(tmp_path, "My Drugs.csv", GOOD_CSV.replace(" diabetes|", " diabetes")))
    assert cs.name == "my_drugs" and cs.family == "custom" and cs.medical
    assert cs.labels["level"].kind == "ordinal" and cs.labels["cls"].kind == "categorical"
    assert cs.templates == ["A patient was started on {concept}."]
    assert list(cs.targets())[0].answers == ("diabetes",)
    assert cs.label_values("level") == [1.0, 2.0]


BAD_CSV = {
    "missing_column": ("id,label:cls\nx,y\n", r"row 1: missing column 'concept'"),
    "unknown_column": ("id,concept,colour\nx,y,z\n", r"row 1: unknown column 'colour'"),
    "unpaired_target": ("id,concept,target:a\nx,y,{concept} is\n", r"needs a matching 'answers:a'"),
    "empty_row": (
        "id,concept,template\n,,A {concept}.\nx,y,\n,,\n",
        r"row 4 is empty",
    ),
    "wrong_field_count": ("id,concept,template\n,,A {concept}.\nx,y\n", r"row 3: 2 fields"),
    "empty_answers": (GOOD_CSV, r"row 3: field 'targets.0.answers'|row 3: .*answer"),
    "non_number": (
        "id,concept,label:age:ordinal,template\n,,,A {concept}.\nx,y,old,\n",
        r"row 3: label 'age' \(ordinal\) must be a number, got 'old'",
    ),
    "empty_concept": ("id,concept,template\n,,A {concept}.\nx,,\n", r"row 3: field 'concept'"),
    "bad_kind": ("id,concept,label:a:fuzzy\n", r"unknown kind 'fuzzy'"),
    "no_template": ("id,concept,label:a\nx,y,z\n", r"row 2: .*no template"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSV))
def test_malformed_csv(tmp_path, case):
    text, pattern = BAD_CSV[case]
    p = write(tmp_path, f"{case}.csv", text)
    with pytest.raises(ConceptFileError, match=pattern):
        load_file(p)


def test_bad_encoding_and_empty_file(tmp_path):
    p = write(tmp_path, "latin.csv", "id,concept\nx,caf\xe9\n".encode("latin-1"), mode="wb")
    with pytest.raises(ConceptFileError, match=r"line 2: not UTF-8 text"):
        load_file(p)
    p = write(tmp_path, "empty.yaml", "  \n")
    with pytest.raises(ConceptFileError, match="is empty"):
        load_file(p)
    with pytest.raises(ConceptFileError, match="does not exist"):
        load_file(tmp_path / "nope.yaml")
    with pytest.raises(ConceptFileError, match="suffix '.txt'"):
        load_file(write(tmp_path, "x.txt", "hi"))


def test_include_stays_inside_directory(tmp_path):
    sub = tmp_path / "sets"
    sub.mkdir()
    (tmp_path / "secret.csv").write_text("id,concept\nx,y\n", encoding="utf-8")
    base = GOOD_YAML.replace("items:\n", "include: [../secret.csv]\nitems:\n")
    with pytest.raises(ConceptFileError, match="outside the concept file's directory"):
        load_file(write(sub, "inc.yaml", base))
    more = """\
    id,concept,source,label:cls,label:dose
    rosuvastatin,rosuvastatin,WHO ATC C10AA07,statin,high
    """
    write(sub, "more.csv", more)
    cs = load_file(
        write(sub, "inc2.yaml", GOOD_YAML.replace("items:\n", "include: more.csv\nitems:\n"))
    )
    assert [it.id for it in cs.items][-1] == "rosuvastatin"
    assert cs.label_values("dose")[-1] == 2.0
    write(sub, "bad.csv", more.replace(",high", ",extreme"))
    with pytest.raises(ConceptFileError, match="item 4: .*'extreme' is not in its order"):
        load_file(
            write(sub, "inc3.yaml", GOOD_YAML.replace("items:\n", "include: bad.csv\nitems:\n"))
        )


def test_cli_list_show_validate(tmp_path, capsys):
    assert main(["concepts", "list"]) == 0
    out = capsys.readouterr().out
    assert "diseases" in out and "progression" in out
    assert main(["concepts", "show", "progression", "--format", "csv"]) == 0
    csv_out = capsys.readouterr().out
    assert csv_out.splitlines()[0].startswith("id,concept,label:series")
    assert len(csv_out.strip().splitlines()) == len(load_concepts("progression")) + 1
    assert main(["concepts", "show", "symptoms", "--format", "json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["name"] == "symptoms" and len(data["items"]) == len(load_concepts("symptoms"))
    good = write(tmp_path, "mini.yaml", GOOD_YAML)
    assert main(["concepts", "validate", str(good)]) == 0
    assert "3 items" in capsys.readouterr().out
    assert main(["concepts", "show", "no_such_set"]) == 2


def test_knows_matches_plain_transformers(tmp_path):
    from medmap.techniques.knowledge import known_fraction, knows
    from tiny import make_tiny

    m = make_tiny("llama")
    cs = load_file(write(tmp_path, "mini.yaml", GOOD_YAML))
    df = knows(m, cs, k=5, batch_size=2)
    assert list(df.item_id) == ["metformin", "atorvastatin", "simvastatin"]
    tok = m.tokenizer
    for row in df.itertuples():
        full = tok(row.prompt + row.best_answer, return_offsets_mapping=True)
        ids = full["input_ids"]
        n_prompt = sum(1 for a, b in full["offset_mapping"] if b <= len(row.prompt))
        with torch.no_grad():
            logp = torch.log_softmax(m.hf(torch.tensor([ids])).logits[0].double(), -1)
        want = sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
        assert row.logprob == pytest.approx(want, abs=1e-4)
        first = logp[n_prompt - 1]
        assert row.rank == int((first > first[ids[n_prompt]]).sum())
        assert row.first_token_known == (row.rank < 5)  # the old first-token criterion, kept
        # known = forced choice: the best accepted answer beats every distractor
        assert row.known == (row.margin > 0)
    frac = known_fraction(df)
    assert frac.loc[0, "n"] == 3
    assert frac.loc[0, "known"] == pytest.approx(df.known.mean())


def test_stratify_key_balances_subsets_on_the_named_label(tmp_path):
    drugs = load_concepts("drugs")
    assert drugs.stratify == "specialty"
    specialties = set(drugs.label_values("specialty"))
    sub = drugs.subset(len(specialties), seed=0)
    assert set(sub.label_values("specialty")) == specialties  # one drug per specialty
    bad = GOOD_YAML.replace("labels:\n", "stratify: dose\nlabels:\n", 1)
    p = tmp_path / "strat.yaml"
    p.write_text(bad, encoding="utf-8")
    with pytest.raises(ConceptFileError, match="stratify: 'dose' is not a categorical label"):
        load_file(p)
