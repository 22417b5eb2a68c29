"""Saliency, lesioning and patching on both bundled real models (a few items each)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medmap
from medmap.model.registry import BUNDLED_MODELS
from medmap.model.sites import SkipBlocks, TraceBlocks, count_hooks
from medmap.model.targets import encode_targets
from medmap.model.tokens import encode, span_tokens
from medmap.techniques import answer_token, lesion, patch, saliency_items

pytestmark = pytest.mark.real

FACTS = [
    ("Metformin is a first-line treatment for type", " 2 diabetes"),
    ("The capital of France is", " Paris"),
]
TEMPLATE = "A patient taking {} is most likely being treated for"
DRUGS = [
    ("insulin", " diabetes"),
    ("morphine", " pain"),
    ("aspirin", " pain"),
    ("warfarin", " thrombosis"),
    ("heparin", " thrombosis"),
]


def _pair(tok):
    """The first clean/corrupt drug pair (different answers) of equal token length."""
    for a, ta in DRUGS:
        for b, tb in DRUGS:
            pa, pb = TEMPLATE.format(a), TEMPLATE.format(b)
            if ta != tb and len(tok(pa).input_ids) == len(tok(pb).input_ids):
                return pa, pb, a, b, ta, tb
    raise AssertionError("no equal-length pair")


@pytest.fixture(scope="module", params=sorted(BUNDLED_MODELS))
def model(request):
    return medmap.load_model(request.param)


def _nll(logits, prompt, target, tok) -> float:
    _, spans = encode_targets(tok, [prompt], [target])
    s = spans[0]
    logp = torch.log_softmax(logits.double(), -1)
    return -sum(logp[t - 1, s.ids[t]].item() for t in range(s.start, s.stop))


def test_lesion_matches_skipblocks(model):
    n = model.n_layers
    layers = [1, n // 2, n]
    prompts, targets = [p for p, _ in FACTS], [t for _, t in FACTS]
    df = lesion(model, prompts, targets, layers=layers)
    for layer in layers:
        for i, (p, t) in enumerate(FACTS):
            batch, _ = encode_targets(model.tokenizer, [p], [t])
            with torch.no_grad(), SkipBlocks(model.adapter, [layer - 1]):
                lg = model.hf(**batch.model_inputs(), use_cache=False).logits[0]
            row = df[(df["layer"] == layer) & (df["item"] == i)].iloc[0]
            np.testing.assert_allclose(
                # batched (padded) vs single-prompt float32 matmuls differ by ~1e-5 nats
                row["nll_lesioned"],
                _nll(lg, p, t, model.tokenizer),
                rtol=1e-4,
                atol=2e-4,
            )
    # the intact models know these facts better than after removing the first block
    first = df[df["layer"] == 1]
    assert (first["delta_nll"] > 0).all()
    assert count_hooks(model.hf) == 0


def test_patching_matches_manual_hook(model):
    tok = model.tokenizer
    CLEAN, CORRUPT, a_word, b_word, ta, tb = _pair(tok)
    s = CLEAN.index(a_word)
    spans = [((s, s + len(a_word)), (s, s + len(b_word)))]
    n = model.n_layers
    df = patch(
        model,
        [CLEAN],
        [CORRUPT],
        [ta],
        [tb],
        layers=[0, n // 2, n],
        positions=["last", "concept"],
        concept_spans=spans,
    )
    r = df[(df["layer"] == n // 2) & (df["position"] == "concept")].iloc[0]
    cb, xb = encode(tok, [CLEAN]), encode(tok, [CORRUPT])
    with torch.no_grad(), TraceBlocks(model.adapter, [n // 2]) as tr:
        model.hf(**cb.model_inputs(), use_cache=False)
    idx = span_tokens(cb.offsets[0], spans[0][0])

    def edit(_l, h):
        h = h.clone()
        h[:, idx] = tr.values[n // 2][:, idx]
        return h

    with torch.no_grad(), TraceBlocks(model.adapter, [n // 2], edit=edit):
        lg = model.hf(**xb.model_inputs(), use_cache=False).logits[0, -1]
    a, b = answer_token(tok, CLEAN, ta), answer_token(tok, CORRUPT, tb)
    np.testing.assert_allclose(r["logit_diff_patched"], float(lg[a] - lg[b]), rtol=1e-4, atol=1e-3)
    # the clean run prefers its own answer more than the corrupt run does
    assert r["logit_diff_clean"] > r["logit_diff_corrupt"]
    # patching the concept at layer 0 swaps the concept's embedding: (nearly) full restoration
    r0 = df[(df["layer"] == 0) & (df["position"] == "concept")].iloc[0]
    assert r0["restored"] == pytest.approx(1.0, abs=1e-3)
    rn = df[(df["layer"] == n) & (df["position"] == "last")].iloc[0]
    assert rn["restored"] == pytest.approx(1.0, abs=1e-3)


def test_saliency_one_item(model):
    df = saliency_items(model, [FACTS[0][0]], [FACTS[0][1]])
    parts = df[df["module"] != "block"]
    assert parts["grad_x_weight_share"].sum() == pytest.approx(1.0)
    blocks = df[df["module"] == "block"]
    assert sorted(blocks["layer"]) == list(range(1, model.n_layers + 1))
    assert (blocks["grad_abs_mean"] > 0).all()
    # both bundled models tie embedding and output matrix: reported once, as embedding
    assert "unembedding" not in set(df["module"])
    biggest = max(p.numel() * p.element_size() for p in model.hf.parameters())
    assert df.attrs["peak_grad_bytes"] == biggest < df.attrs["total_grad_bytes"]
    assert all(p.grad is None and not p.requires_grad for p in model.hf.parameters())
