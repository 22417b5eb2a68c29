"""Sub-module lesioning and patching on both bundled models equal a hand-replaced forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medmap
from medmap.model.registry import BUNDLED_MODELS
from medmap.model.sites import count_hooks
from medmap.model.targets import encode_targets, prediction_index, target_scores
from medmap.model.tokens import encode
from medmap.techniques import answer_token, lesion, patch
from test_architectures import hand_forward

pytestmark = pytest.mark.real

PROMPTS = ["Metformin is a first-line treatment for type"]
TARGETS = [" 2 diabetes"]
TEMPLATE = "A patient taking {} is most likely being treated for"


@pytest.fixture(scope="module", params=sorted(BUNDLED_MODELS))
def model(request):
    return medmap.load_model(request.param)


def _sub(model, site, b):
    return model.adapter.attn(b) if site == "attn" else model.adapter.mlp(b)


@pytest.mark.parametrize("site", ["attn", "mlp"])
def test_lesion_submodule_equals_hand_zeroed_forward(model, site):
    layer = model.n_layers // 2
    df = lesion(model, PROMPTS, TARGETS, layers=[layer], site=site)
    batch, spans = encode_targets(model.tokenizer, PROMPTS, TARGETS)
    rows, cols, _, _ = prediction_index(spans)
    with torch.no_grad(), hand_forward(_sub(model, site, layer - 1), torch.zeros_like):
        logits = model.hf(**batch.model_inputs()).logits
    ref = target_scores(logits[rows, cols], spans)["nll"].numpy()
    np.testing.assert_allclose(df["nll_lesioned"].to_numpy(), ref, rtol=1e-4, atol=1e-3)
    assert df["delta_nll"].abs().max() > 1e-3
    assert count_hooks(model.hf) == 0


def test_patch_mlp_equals_hand_replaced_forward(model):
    tok = model.tokenizer
    clean, corrupt = TEMPLATE.format("insulin"), TEMPLATE.format("morphine")
    for drug in ("aspirin", "morphine"):  # a pair of equal token length
        if len(tok(clean).input_ids) == len(tok(TEMPLATE.format(drug)).input_ids):
            corrupt = TEMPLATE.format(drug)
            break
    assert len(tok(clean).input_ids) == len(tok(corrupt).input_ids)
    layer = model.n_layers // 2
    df = patch(model, [clean], [corrupt], [" diabetes"], [" pain"], layers=[layer], site="mlp")
    mod = _sub(model, "mlp", layer - 1)
    kept = []
    with torch.no_grad(), hand_forward(mod, lambda h: kept.append(h) or h):
        model.hf(**encode(tok, [clean]).model_inputs())

    def put(h):
        h = h.clone()
        h[:, -1] = kept[0][:, -1]
        return h

    with torch.no_grad(), hand_forward(mod, put):
        logits = model.hf(**encode(tok, [corrupt]).model_inputs()).logits[0, -1].float()
    a, c = answer_token(tok, clean, " diabetes"), answer_token(tok, corrupt, " pain")
    np.testing.assert_allclose(
        df["logit_diff_patched"].iloc[0], float(logits[a] - logits[c]), rtol=1e-4, atol=1e-3
    )
    assert abs(df["logit_diff_patched"].iloc[0] - df["logit_diff_corrupt"].iloc[0]) > 1e-4
