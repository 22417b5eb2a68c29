"""`knows` on the bundled real models: well-known facts are known, scores match plain HF."""

from __future__ import annotations

import pytest
import torch

import medmap
from medmap.concepts import load_concepts
from medmap.concepts.knows import knows

pytestmark = pytest.mark.real


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def model(request):
    return medmap.load_model(request.param)


def test_capitals_are_known_and_logprobs_match_hf(model):
    countries = load_concepts("countries")
    keep = [it for it in countries.items if it.id in ("france", "japan", "germany")]
    cs = countries.model_copy(update={"items": keep})
    df = knows(model, cs, k=10)
    cap = df[df.target_id == "capital"].set_index("item_id")
    assert cap.loc["france", "best_answer"].strip() == "Paris"
    assert cap.loc["france", "rank"] < 10 and cap.loc["france", "known"]
    assert cap.loc["japan", "best_answer"].strip() == "Tokyo" and cap.loc["japan", "known"]
    row = cap.loc["france"]
    tok = model.tokenizer
    ids = tok(row.prompt + row.best_answer)["input_ids"]
    n_prompt = len(tok(row.prompt)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model.hf(torch.tensor([ids])).logits[0].double(), -1)
    want = sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
    assert row.logprob == pytest.approx(want, abs=1e-3)


def test_bfloat16_stays_within_tolerance_of_float32():
    from medmap.precision import compare_precision

    ref = medmap.load_model("smollm2-135m")
    low = medmap.load_model("smollm2-135m", dtype="bfloat16")
    df = compare_precision(ref, low)
    layers = df[df.layer >= 0]
    assert len(layers) == ref.n_layers + 1
    assert layers["cosine"].min() > 0.99 and layers["ok"].all()
    assert (layers["rel_l2"] > 0).any()  # bf16 really differs from float32
    lp = df[df.layer == -1].iloc[0]
    assert 0 < lp["logprob_max_abs_diff"] < 0.5 and lp["ok"]
