"""`knows` on the bundled real models: capitals are known by forced choice (and not with moved
answers); whole-answer log-probabilities equal plain transformers."""

from __future__ import annotations

import pytest
import torch

import medmap
from medmap.concepts import load_concepts
from medmap.techniques.knowledge import knows

pytestmark = pytest.mark.real


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def model(request):
    return medmap.load_model(request.param)


def _plain_logprob(model, prompt: str, answer: str) -> float:
    tok = model.tokenizer
    ids = tok(prompt + answer)["input_ids"]
    n_prompt = len(tok(prompt)["input_ids"])
    assert ids[:n_prompt] == tok(prompt)["input_ids"]  # no merge across the boundary here
    with torch.no_grad():
        logp = torch.log_softmax(model.hf(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))


def test_capitals_are_known_by_forced_choice_and_logprobs_match_hf(model):
    countries = load_concepts("countries")
    keep = [it for it in countries.items if it.id in ("france", "japan", "germany", "italy")]
    cs = countries.model_copy(update={"items": keep})
    df = knows(model, cs, k=10)
    cap = df[df.target_id == "capital"].set_index("item_id")
    assert cap.loc["france", "best_answer"].strip() == "Paris"
    assert cap.loc["japan", "best_answer"].strip() == "Tokyo"
    for item in ("france", "japan"):
        row = cap.loc[item]
        assert row.known and row.margin > 0 and row.n_candidates == 4 and row.chance == 0.25
        assert not row.control_known and row.control_margin < 0
    # the best answer and the best distractor equal the plain full-sequence computation
    row = cap.loc["france"]
    want = _plain_logprob(model, row.prompt, row.best_answer)
    assert row.logprob == pytest.approx(want, abs=1e-3)
    d = _plain_logprob(model, row.prompt, row.best_distractor)
    assert row.margin == pytest.approx(want - d, abs=1e-3)
    assert row.best_distractor.strip() in ("Tokyo", "Berlin", "Rome")


def test_bfloat16_stays_within_tolerance_of_float32():
    from medmap.model.precision import compare_precision

    ref = medmap.load_model("smollm2-135m")
    low = medmap.load_model("smollm2-135m", dtype="bfloat16")
    df = compare_precision(ref, low)
    layers = df[df.layer >= 0]
    assert len(layers) == ref.n_layers + 1
    assert layers["cosine"].min() > 0.99 and layers["ok"].all()
    assert (layers["rel_l2"] > 0).any()  # bf16 really differs from float32
    lp = df[df.layer == -1].iloc[0]
    assert 0 < lp["logprob_max_abs_diff"] < 0.5 and lp["ok"]
