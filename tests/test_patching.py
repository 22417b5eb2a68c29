"""Activation patching: identities, full restoration, and agreement with a manual hook patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmap.analysis.results import COLUMNS
from medmap.errors import MedmapError
from medmap.model.sites import TraceBlocks, count_hooks
from medmap.model.tokens import encode, span_tokens
from medmap.techniques import answer_token, patch, patch_summary
from tiny import CAUSAL_ARCHS, make_tiny

CLEAN = ["A 47-year-old woman presents with", "The patient took insulin for", "A dog is a"]
CORRUPT = ["A 80-year-old woman presents with", "The patient took aspirin for", "A cat is a"]
CLEAN_ANS = [" chest pain", " diabetes", " mammal"]
CORRUPT_ANS = [" shortness of breath", " pain", " pet"]
SPANS = [(2, 4), (17, 24), (2, 5)]  # the concept in each clean prompt
POSITIONS = ["last", "concept", "all"]


def _manual(model, i: int, layer: int, pos: str, direction: str) -> float:
    """Patched logit difference from TraceBlocks (record, then edit) + a plain HF forward."""
    tok = model.tokenizer
    src, dst = (CLEAN, CORRUPT) if direction == "denoise" else (CORRUPT, CLEAN)
    sb, db = encode(tok, [src[i]]), encode(tok, [dst[i]])
    with torch.no_grad(), TraceBlocks(model.adapter, [layer]) as tr:
        model.hf(**sb.model_inputs())
    value = tr.values[layer]
    n = sb.lengths[0]
    toks = {"last": [n - 1], "all": list(range(n)), "concept": span_tokens(sb.offsets[0], SPANS[i])}
    idx = toks[pos]
    if pos == "concept" and direction == "noise":
        idx = span_tokens(db.offsets[0], SPANS[i])

    def edit(_layer, h):
        h = h.clone()
        h[:, idx] = value[:, idx]
        return h

    with torch.no_grad(), TraceBlocks(model.adapter, [layer], edit=edit):
        logits = model.hf(**db.model_inputs()).logits[0, -1]
    a = answer_token(tok, CLEAN[i], CLEAN_ANS[i])
    b = answer_token(tok, CORRUPT[i], CORRUPT_ANS[i])
    return float(logits[a] - logits[b])


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_cells_equal_manual_hook_patch(arch, direction):
    model = make_tiny(arch, seed=5)
    df = patch(
        model,
        CLEAN,
        CORRUPT,
        CLEAN_ANS,
        CORRUPT_ANS,
        positions=POSITIONS,
        concept_spans=SPANS,
        batch_size=2,
        direction=direction,
    )
    n = model.n_layers
    assert len(df) == (n + 1) * len(POSITIONS) * len(CLEAN)
    assert (df["direction"] == direction).all()
    for _, r in df.sample(10, random_state=1).iterrows():
        ld = _manual(model, int(r["pair"]), int(r["layer"]), r["position"], direction)
        np.testing.assert_allclose(r["logit_diff_patched"], ld, rtol=1e-4, atol=1e-4)
    # the patch matters somewhere (the comparison could fail)
    assert (df["logit_diff_patched"] - df["logit_diff_corrupt"]).abs().max() > 1e-3
    assert count_hooks(model.hf) == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_patching_final_residual_at_all_positions_restores_exactly(arch):
    model = make_tiny(arch, seed=6)
    n = model.n_layers
    for direction, expect in (("denoise", "logit_diff_clean"), ("noise", "logit_diff_corrupt")):
        df = patch(
            model,
            CLEAN,
            CORRUPT,
            CLEAN_ANS,
            CORRUPT_ANS,
            layers=[n],
            positions="all",
            direction=direction,
        )
        np.testing.assert_allclose(df["logit_diff_patched"], df[expect], rtol=1e-5, atol=1e-5)
        ok = (df["logit_diff_clean"] - df["logit_diff_corrupt"]).abs() > 1e-3
        assert ok.any()
        expected_restored = 1.0 if direction == "denoise" else 0.0
        np.testing.assert_allclose(df["restored"][ok], expected_restored, atol=1e-3)
    # layer 0 at all positions swaps the whole input: also a full restoration
    df0 = patch(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, layers=[0], positions="all")
    np.testing.assert_allclose(df0["logit_diff_patched"], df0["logit_diff_clean"], atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_patching_own_activation_changes_nothing(arch):
    model = make_tiny(arch, seed=7)
    df = patch(
        model,
        CLEAN,
        CLEAN,
        CLEAN_ANS,
        CORRUPT_ANS,
        positions=POSITIONS,
        concept_spans=SPANS,
    )
    np.testing.assert_allclose(df["logit_diff_patched"], df["logit_diff_clean"], atol=1e-5)
    assert df["restored"].isna().all()  # LD_clean == LD_corrupt: undefined, not 0/0 garbage
    assert df["logit_diff_clean"].abs().min() > 0


def test_stacked_positions_equal_one_position_at_a_time():
    model = make_tiny("gemma3_text", seed=8)
    kw = dict(concept_spans=SPANS, batch_size=3)
    stacked = patch(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, positions=POSITIONS, **kw)
    for pos in POSITIONS:
        single = patch(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, positions=pos, **kw)
        ref = stacked[stacked["position"] == pos].reset_index(drop=True)
        np.testing.assert_allclose(
            single["logit_diff_patched"], ref["logit_diff_patched"], rtol=1e-5, atol=1e-5
        )
        assert list(single["layer"]) == list(ref["layer"])


def test_summary_rows():
    model = make_tiny("llama", seed=9)
    df = patch(
        model,
        CLEAN,
        CORRUPT,
        CLEAN_ANS,
        CORRUPT_ANS,
        positions=["last", "concept"],
        concept_spans=SPANS,
        concept_set="ages",
        pair_ids=["x", "y", "z"],
        direction="noise",
    )
    assert list(df["pair_id"][:3]) == ["x", "y", "z"]
    tidy = patch_summary(df, n_boot=50)
    assert list(tidy.columns[: len(COLUMNS)]) == COLUMNS
    assert set(tidy["metric"]) == {"restored", "noised_drop"}
    assert (tidy["technique"] == "patching").all() and set(tidy["position"]) == {"last", "concept"}
    r = tidy[(tidy["layer"] == 1) & (tidy["position"] == "last") & (tidy["metric"] == "restored")]
    sel = df[(df["layer"] == 1) & (df["position"] == "last")]
    assert r["value"].iloc[0] == pytest.approx(sel["restored"].mean())
    assert r["relative_depth"].iloc[0] == pytest.approx(1 / 3)
    d = tidy[
        (tidy["layer"] == 1) & (tidy["position"] == "last") & (tidy["metric"] == "noised_drop")
    ]
    assert d["value"].iloc[0] == pytest.approx(1 - sel["restored"].mean())


def test_user_errors():
    model = make_tiny("llama")
    with pytest.raises(MedmapError, match="same token length"):
        patch(model, ["A dog is a"], ["A London is a"], [" x"], [" y"])
    with pytest.raises(MedmapError, match="concept_spans"):
        patch(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, positions="concept")
    with pytest.raises(MedmapError, match="unknown patch position"):
        patch(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, positions="first")
    with pytest.raises(MedmapError, match="direction"):
        patch(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, direction="up")
    with pytest.raises(MedmapError, match="out of range"):
        patch(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, layers=[4])
