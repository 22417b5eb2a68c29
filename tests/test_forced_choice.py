"""Forced-choice knowledge scoring on tiny random models: exact log-probabilities, batching,
candidate sets, the moved-answer control and the known-only filter."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from medmap.concepts.schema import ConceptSet
from medmap.techniques.knowledge import (
    forced_choices,
    known_fraction,
    known_items,
    knows,
    score_candidates,
)
from tiny import CAUSAL_ARCHS, make_tiny

PROMPTS = [
    "Metformin is a first-line treatment for",
    "The capital of France is",
    "A dog is a",
]
ANSWERS = [
    [" type 2 diabetes", " high cholesterol", " chest pain radiating to the left arm"],
    [" Paris", " the left arm", "n 80-year-old man"],  # "a" + "n": may merge across the boundary
    [" mammal", " statin"],
]


def plain_logprob(model, prompt: str, answer: str) -> float:
    """Summed log-probability of ``answer`` after ``prompt``: one full sequence, plain HF."""
    tok = model.tokenizer
    enc = tok(prompt + answer, return_offsets_mapping=True)
    ids = enc["input_ids"]
    # the answer's tokens: those ending after the prompt (a merged boundary token included)
    start = next(t for t, (a, b) in enumerate(enc["offset_mapping"]) if b > a and b > len(prompt))
    with torch.no_grad():
        logp = torch.log_softmax(model.hf(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_logprobs_equal_plain_full_sequence_and_batching_does_not_matter(arch):
    model = make_tiny(arch)
    want = [[plain_logprob(model, p, a) for a in row] for p, row in zip(PROMPTS, ANSWERS)]
    for batch_size, prompt_batch in [(32, 8), (1, 1), (2, 2)]:
        got = score_candidates(
            model, PROMPTS, ANSWERS, batch_size=batch_size, prompt_batch=prompt_batch
        )
        for i in range(len(ANSWERS)):
            assert got[i]["logprob"].tolist() == pytest.approx(want[i], abs=1e-4)
            assert (got[i]["per_token"] == got[i]["logprob"] / got[i]["n_tokens"]).all()
    # one at a time equals batched
    for i, row in enumerate(ANSWERS):
        for j, a in enumerate(row):
            one = score_candidates(model, [PROMPTS[i]], [[a]])[0]
            assert float(one["logprob"].iloc[0]) == pytest.approx(want[i][j], abs=1e-4)
            assert int(one["n_tokens"].iloc[0]) == int(got[i]["n_tokens"].iloc[j])


def test_first_rank_is_the_rank_of_the_first_answer_token():
    model = make_tiny("llama")
    got = score_candidates(model, PROMPTS[:1], [ANSWERS[0]])[0]
    tok = model.tokenizer
    ids = tok(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        last = model.hf(torch.tensor([ids])).logits[0, -1]
    for j, a in enumerate(ANSWERS[0]):
        first = tok(PROMPTS[0] + a)["input_ids"][len(ids)]
        assert int(got["first_rank"].iloc[j]) == int((last > last[first]).sum())


def _set(n_items: int = 12, extra: dict | None = None) -> ConceptSet:
    """Items with distinct one-word answers (one per item) under one target id."""
    words = [
        "heart",
        "liver",
        "lung",
        "kidney",
        "brain",
        "skin",
        "bone",
        "blood",
        "stomach",
        "colon",
        "eye",
        "ear",
    ]
    items = []
    for i in range(n_items):
        target = {
            "id": "organ",
            "prompt": "The patient {concept} has a problem of the",
            "answers": [f" {words[i]}"],
        }
        if extra and i in extra:
            target["distractors"] = extra[i]
        items.append({"id": f"p{i}", "concept": f"case {i}", "targets": [target]})
    return ConceptSet.model_validate(
        {
            "name": "organs_test",
            "version": 1,
            "family": "custom",
            "medical": False,
            "templates": ["{concept} is here."],
            "items": items,
        }
    )


def test_candidates_are_disjoint_answers_of_other_items_capped_and_seeded():
    cs = _set(12, extra={0: [" toe", " spleen"]})
    targets = list(cs.targets())
    real, control, moved = forced_choices(targets, max_distractors=5, seed=3)
    assert real[0].accepted == (" heart",)
    assert real[0].distractors[:2] == (" toe", " spleen")  # the file's distractors come first
    for r, t in zip(real, targets):
        assert len(r.distractors) == 5 and len(set(r.distractors)) == 5
        assert not {d.strip() for d in r.distractors} & {a.strip() for a in t.answers}
    assert forced_choices(targets, max_distractors=5, seed=3)[0] == real
    assert forced_choices(targets, max_distractors=5, seed=4)[0] != real
    # the control takes another item's answers as right; the true answer becomes a distractor
    for i, (c, j) in enumerate(zip(control, moved)):
        assert j is not None and j != i
        assert c.accepted == targets[j].answers
        assert c.distractors[0] == targets[i].answers[0] and len(c.distractors) == 5
    assert sorted(moved) == list(range(12))  # a cycle: every item's answers are moved once
    # an item sharing an answer is not a distractor
    full = forced_choices(targets, max_distractors=100)[0]
    assert len(full[1].distractors) == 11


def test_overlapping_answer_lists_are_not_distractors():
    cs = _set(3)
    items = [it.model_dump() for it in cs.items]
    items[1]["targets"][0]["answers"] = [" liver", " heart"]  # overlaps item 0
    cs = ConceptSet.model_validate({**cs.model_dump(), "items": items})
    real, _, moved = forced_choices(list(cs.targets()), max_distractors=100)
    assert set(real[0].distractors) == {" lung"}
    assert moved[0] == 2 and moved[1] == 2


@pytest.mark.parametrize("seed", [0, 1])
def test_random_model_knows_at_chance_with_right_and_moved_answers(seed):
    model = make_tiny("llama", seed=seed)
    cs = _set(12)
    df = knows(model, cs, max_distractors=3, seed=seed)
    assert (df["n_candidates"] == 4).all() and (df["chance"] == 0.25).all()
    assert df["known"].dtype == bool
    assert ((df["margin"] > 0) == df["known"]).all()
    frac = known_fraction(df).iloc[0]
    assert frac["chance"] == pytest.approx(0.25) and frac["n"] == 12
    assert frac["control_chance"] == pytest.approx(0.25)
    # 12 items at p = 0.25: outside [0, 0.75] has probability < 1e-3 under the null
    assert frac["known"] <= 0.75 and frac["control"] <= 0.75


def test_a_model_that_knows_every_fact_is_known_with_right_answers_and_not_moved(monkeypatch):
    """Fake scores: the item's own answer is likely, all others equally unlikely (they would
    all share a first token in real data). Forced choice: known 100 %, moved control 0 %."""
    import medmap.techniques.knowledge as kn

    words = [
        "heart",
        "liver",
        "lung",
        "kidney",
        "brain",
        "skin",
        "bone",
        "blood",
        "stomach",
        "colon",
        "eye",
        "ear",
    ]

    def fake(model, prompts, answers, **kw):
        out = []
        for p, row in zip(prompts, answers):
            right = f" {words[int(p.split()[3])]}"
            lp = [-1.0 if a == right else -5.0 for a in row]
            out.append(
                pd.DataFrame({"logprob": lp, "n_tokens": 1, "per_token": lp, "first_rank": 0})
            )
        if kw.get("advance"):
            kw["advance"](1)
        return out

    monkeypatch.setattr(kn, "score_candidates", fake)
    monkeypatch.setattr(kn, "n_prompt_passes", lambda *a, **k: 1)
    df = kn.knows(make_tiny("llama"), _set(12), max_distractors=4)
    assert df["known"].all() and df["first_token_known"].all()
    assert (df["margin"] == 4.0).all()
    assert not df["control_known"].any() and (df["control_margin"] == -4.0).all()
    frac = known_fraction(df).iloc[0]
    assert frac["known"] == 1.0 and frac["control"] == 0.0
    assert frac["chance"] == pytest.approx(0.2)


def test_known_items_keeps_exactly_the_known_targets():
    model = make_tiny("llama", seed=2)
    df = knows(model, _set(12), max_distractors=3)
    keep = known_items(df)
    assert keep == {(r.item_id, r.target_id) for r in df.itertuples() if r.known}
    assert 0 < len(keep) < 12 or df["known"].all() or not df["known"].any()


def test_known_only_keeps_exactly_the_known_targets_and_summary_counts_them(monkeypatch):
    """Fake scores: items 0, 2, 4 ... prefer their own answer, odd items prefer another one."""
    import medmap.techniques.knowledge as kn

    words = ["heart", "liver", "lung", "kidney", "brain", "skin", "bone", "blood"]

    def fake(model, prompts, answers, **kw):
        out = []
        for p, row in zip(prompts, answers):
            i = int(p.split()[3])
            right = f" {words[i]}" if i % 2 == 0 else f" {words[(i + 1) % 8]}"
            lp = [-1.0 if a == right else -5.0 for a in row]
            out.append(pd.DataFrame({"logprob": lp, "n_tokens": 1, "per_token": lp,
                                     "first_rank": 0}))  # fmt: skip
        return out

    monkeypatch.setattr(kn, "score_candidates", fake)
    monkeypatch.setattr(kn, "n_prompt_passes", lambda *a, **k: 1)
    cs = _set(8)
    df = kn.knows(make_tiny("llama"), cs, max_distractors=100)
    assert df.set_index("item_id")["known"].to_dict() == {f"p{i}": i % 2 == 0 for i in range(8)}
    kept = kn.known_only(cs, df, min_known=4)
    assert [it.id for it in kept.items] == ["p0", "p2", "p4", "p6"]
    assert kept.items[0].targets == cs.items[0].targets
    assert kn.known_only(cs, df, min_known=5) is None  # too few known facts: not mapped
    s = kn.knows_summary(df, min_known=5, n_boot=20).set_index("metric")
    assert s.loc["known_fraction", "value"] == 0.5
    assert s.loc["known_fraction", "baseline"] == pytest.approx(1 / 8)
    assert s.loc["n_known", "value"] == 4 and s.loc["too_few_known", "value"] == 1.0
    assert (s["technique"] == "knows").all() and (s["layer"] == -1).all()
