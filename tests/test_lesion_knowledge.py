"""Lesions measured on knowledge: forced-choice margin under a lesion, generic damage on neutral
text, fact-specific damage. Checked against plain transformers with the block deleted."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medmap.concepts.schema import ConceptSet
from medmap.model.adapter import find_layers
from medmap.techniques.knowledge import forced_choices
from medmap.techniques.lesioning import (
    add_specific_damage,
    generic_damage,
    lesion,
    lesion_knowledge_summary,
    lesion_margins,
    neutral_sentences,
)
from tiny import make_tiny

WORDS = ["heart", "liver", "lung", "kidney", "brain", "skin"]


def _targets():
    items = [
        {
            "id": f"p{i}",
            "concept": f"case {i}",
            "targets": [
                {
                    "id": "organ",
                    "prompt": "The patient {concept} has a problem of the",
                    "answers": [f" {w}", f" {w} area"] if i == 0 else [f" {w}"],
                }
            ],
        }
        for i, w in enumerate(WORDS)
    ]
    cs = ConceptSet.model_validate(
        {"name": "organs_test", "version": 1, "family": "custom", "medical": False,
         "templates": ["{concept} is here."], "items": items}
    )  # fmt: skip
    return list(cs.targets())


def _without_block(hf, b: int):
    hf = copy.deepcopy(hf)
    del find_layers(hf).blocks[b]
    hf.config.num_hidden_layers -= 1
    if getattr(hf.config, "layer_types", None):
        hf.config.layer_types = [t for i, t in enumerate(hf.config.layer_types) if i != b]
    return hf


def _plain_logprob(hf, tok, prompt: str, answer: str) -> float:
    """Summed answer log-probability from one full sequence (no cache), plain HF."""
    enc = tok(prompt + answer, return_offsets_mapping=True)
    ids = enc["input_ids"]
    start = next(t for t, (a, b) in enumerate(enc["offset_mapping"]) if b > a and b > len(prompt))
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids]), use_cache=False).logits[0].double(), -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


def _margin(hf, tok, target, choice) -> float:
    lp = np.array([_plain_logprob(hf, tok, target.prompt, a) for a in choice.candidates])
    a = len(choice.accepted)
    return float(lp[:a].max() - lp[a:].max())


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_lesion_margin_equals_forced_choice_on_the_model_without_the_block(arch):
    model = make_tiny(arch, seed=5)
    targets = _targets()
    choices = forced_choices(targets, max_distractors=3, seed=1)[0]
    df = lesion_margins(model, targets, choices=choices, concept_set="organs_test", batch_size=4)
    assert len(df) == model.n_layers * len(targets)
    for i, t in enumerate(targets):
        base = _margin(model.hf, model.tokenizer, t, choices[i])
        rows = df[df["item_id"] == f"{t.item_id}/organ"]
        assert rows["margin_base"].to_numpy() == pytest.approx([base] * model.n_layers, abs=1e-4)
        assert (rows["correct_base"] == float(base > 0)).all()
        assert int(rows["n_candidates"].iloc[0]) == len(choices[i].candidates)
    for b in range(model.n_layers):
        ref = _without_block(model.hf, b)
        for i, t in enumerate(targets):
            row = df[(df["layer"] == b + 1) & (df["item_id"] == f"{t.item_id}/organ")].iloc[0]
            want = _margin(ref, model.tokenizer, t, choices[i])
            assert row["margin_lesioned"] == pytest.approx(want, abs=1e-4)
            assert row["delta_margin"] == pytest.approx(want - row["margin_base"], abs=1e-4)
            assert row["correct_lesioned"] == float(want > 0)
    assert (df["delta_margin"].abs() > 1e-3).any()
    # delta_nll is the first accepted answer's, exactly as lesion() reports it
    plain = lesion(
        model, [t.prompt for t in targets], [t.answers[0] for t in targets], batch_size=4
    )
    np.testing.assert_allclose(
        df.sort_values(["layer", "item_id"])["delta_nll"].to_numpy(),
        plain.sort_values(["layer", "item"])["delta_nll"].to_numpy(),
        atol=1e-5,
    )


def test_generic_damage_is_the_token_mean_nll_change_on_neutral_text():
    model = make_tiny("llama", seed=6)
    sents = neutral_sentences(5)
    g = generic_damage(model, sentences=sents, batch_size=2)
    assert list(g["layer"]) == [1, 2, 3] and (g["n_sentences"] == 5).all()

    def token_mean(hf) -> float:
        tot, n = 0.0, 0
        for s in sents:
            head, _, rest = s.partition(" ")
            tot -= _plain_logprob(hf, model.tokenizer, head, " " + rest)
            n += len(model.tokenizer(s)["input_ids"]) - len(model.tokenizer(head)["input_ids"])
        assert n == int(g["n_tokens"].iloc[0])
        return tot / n

    base = token_mean(model.hf)
    assert g["nll_base"].to_numpy() == pytest.approx([base] * 3, abs=1e-4)
    for b in range(3):
        want = token_mean(_without_block(model.hf, b)) - base
        assert g["generic_delta_nll"].iloc[b] == pytest.approx(want, abs=1e-4)


def test_specific_damage_is_the_margin_loss_beyond_the_generic_fit():
    model = make_tiny("llama", seed=7)
    targets = _targets()
    df = lesion_margins(model, targets, max_distractors=3, concept_set="organs_test")
    gen = generic_damage(model, sentences=neutral_sentences(6))
    out = add_specific_damage(df, gen)
    per_layer = out.groupby("layer").agg(
        s=("specific_damage", "mean"), g=("generic_delta_nll", "first"), d=("delta_margin", "mean")
    )
    beta = float(out["beta"].iloc[0])
    # least squares through the origin: the residual is orthogonal to the generic damage
    assert float((per_layer["s"] * per_layer["g"]).sum()) == pytest.approx(0, abs=1e-8)
    assert per_layer["s"].to_numpy() == pytest.approx(
        (-per_layer["d"] - beta * per_layer["g"]).to_numpy()
    )
    tidy = lesion_knowledge_summary(out, n_boot=20)
    assert set(tidy["metric"]) == {
        "delta_margin", "delta_correct", "specific_damage", "generic_delta_nll"
    }  # fmt: skip
    dm = tidy[tidy.metric == "delta_margin"].set_index("layer")["value"]
    assert dm.to_numpy() == pytest.approx(per_layer["d"].to_numpy())
    with pytest.raises(Exception, match="missing"):
        add_specific_damage(df, gen[gen.layer != 2])


def test_neutral_text_is_a_few_hundred_sourced_sentences():
    from importlib.resources import files

    sents = neutral_sentences()
    assert len(sents) >= 200
    assert all(len(s.split()) >= 4 for s in sents)
    header = (files("medmap.concepts") / "data" / "neutral.txt").read_text().splitlines()[:12]
    assert any("King James" in h for h in header) and any("Austen" in h for h in header)
    words = set(" ".join(sents).lower().replace(",", " ").replace(".", " ").split())
    assert not words & {"diabetes", "metformin", "patient", "disease", "treatment"}
