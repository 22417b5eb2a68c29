"""Layer lesioning: prefix-reusing sweep equals deleting blocks / SkipBlocks on tiny models."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from medmap.analysis.results import COLUMNS
from medmap.errors import MedmapError
from medmap.model.adapter import find_layers
from medmap.model.sites import SkipBlocks, count_hooks
from medmap.model.targets import encode_targets
from medmap.techniques import lesion, lesion_specificity, lesion_summary
from tiny import CAUSAL_ARCHS, make_tiny

PROMPTS = [
    "A 47-year-old woman presents with",
    "Metformin is a first-line treatment for",
    "The capital of France is",
]
TARGETS = [" chest pain radiating", " type 2 diabetes", " Paris"]


def _scores(logits: torch.Tensor, prompt: str, target: str, tok) -> tuple[float, float, float]:
    """Reference NLL / top-1 / top-5 of one unpadded sequence's full logits ``(seq, vocab)``."""
    _, spans = encode_targets(tok, [prompt], [target])
    s = spans[0]
    logp = torch.log_softmax(logits.double(), -1)
    nll = -sum(logp[t - 1, s.ids[t]].item() for t in range(s.start, s.stop))
    first = logits[s.start - 1]
    rank = int((first > first[s.ids[s.start]]).sum())
    return nll, float(rank < 1), float(rank < 5)


def _without_block(hf, b: int):
    """Deep copy of ``hf`` with block ``b`` deleted from its block list and config adjusted."""
    m = copy.deepcopy(hf)
    ad = find_layers(m)
    del ad.blocks[b]
    cfg = m.config
    cfg.num_hidden_layers = cfg.num_hidden_layers - 1  # gpt2 maps this to n_layer
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i != b]
    return m


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_lesion_equals_deleting_the_block(arch):
    model = make_tiny(arch, seed=1)
    df = lesion(model, PROMPTS, TARGETS, batch_size=2)
    assert sorted(df["layer"].unique()) == [1, 2, 3]
    assert len(df) == 3 * len(PROMPTS)
    for b in range(model.n_layers):
        ref = _without_block(model.hf, b)
        assert len(find_layers(ref).blocks) == model.n_layers - 1
        for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
            batch, _ = encode_targets(model.tokenizer, [p], [t])
            with torch.no_grad():
                lg = ref(**batch.model_inputs(), use_cache=False).logits[0]
                lg0 = model.hf(**batch.model_inputs()).logits[0]
            nll, top1, top5 = _scores(lg, p, t, model.tokenizer)
            nll0, top10, top50 = _scores(lg0, p, t, model.tokenizer)
            row = df[(df["layer"] == b + 1) & (df["item"] == i)].iloc[0]
            assert row["block"] == b
            np.testing.assert_allclose(row["nll_lesioned"], nll, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(row["nll_base"], nll0, rtol=1e-5, atol=1e-5)
            assert row["top1_lesioned"] == top1 and row["topk_lesioned"] == top5
            assert row["top1_base"] == top10 and row["topk_base"] == top50
            np.testing.assert_allclose(row["delta_nll"], nll - nll0, rtol=1e-4, atol=1e-4)
    # the lesion changes the model's output (the test could fail)
    assert (df["delta_nll"].abs() > 1e-3).any()
    assert count_hooks(model.hf) == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_window_lesion_equals_skipblocks(arch):
    model = make_tiny(arch, seed=2, n_layers=4)
    df = lesion(model, PROMPTS, TARGETS, window=2, batch_size=3)
    assert sorted(df["layer"].unique()) == [1, 2, 3]
    assert (df["window"] == 2).all()
    for layer in (1, 2, 3):
        for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
            batch, _ = encode_targets(model.tokenizer, [p], [t])
            with torch.no_grad(), SkipBlocks(model.adapter, [layer - 1, layer]):
                lg = model.hf(**batch.model_inputs()).logits[0]
            nll, _, _ = _scores(lg, p, t, model.tokenizer)
            row = df[(df["layer"] == layer) & (df["item"] == i)].iloc[0]
            np.testing.assert_allclose(row["nll_lesioned"], nll, rtol=1e-5, atol=1e-5)


def test_batching_and_layer_subset_do_not_change_values():
    model = make_tiny("qwen2", seed=3)
    full = lesion(model, PROMPTS, TARGETS, batch_size=3)
    one = lesion(model, PROMPTS, TARGETS, layers=[2], batch_size=1)
    ref = full[full["layer"] == 2].reset_index(drop=True)
    np.testing.assert_allclose(one["nll_lesioned"], ref["nll_lesioned"], rtol=1e-5, atol=1e-5)
    assert list(one["item"]) == [0, 1, 2]


def test_summary_and_specificity_rows():
    model = make_tiny("llama", seed=4)
    med = lesion(model, PROMPTS[:2], TARGETS[:2], concept_set="drugs", item_ids=["a", "b"])
    ctl = lesion(model, PROMPTS[2:], TARGETS[2:], concept_set="control")
    assert list(med["item_id"][:2]) == ["a", "b"]
    tidy = lesion_summary(med, n_boot=50)
    assert list(tidy.columns[: len(COLUMNS)]) == COLUMNS
    assert set(tidy["metric"]) == {"delta_nll", "delta_top1", "delta_topk"}
    assert (tidy["technique"] == "lesion").all() and (tidy["window"] == 1).all()
    row = tidy[(tidy["layer"] == 2) & (tidy["metric"] == "delta_nll")].iloc[0]
    sel = med[med["layer"] == 2]
    assert row["value"] == pytest.approx(sel["delta_nll"].mean())
    assert row["baseline"] == pytest.approx(sel["nll_base"].mean())
    assert row["relative_depth"] == pytest.approx(2 / 3)
    assert row["n"] == 2 and row["ci_low"] <= row["value"] <= row["ci_high"]
    spec = lesion_specificity(med, ctl, n_boot=50)
    s2 = spec[spec["layer"] == 2].iloc[0]
    c2 = ctl[ctl["layer"] == 2]["delta_nll"].mean()
    assert s2["value"] == pytest.approx(sel["delta_nll"].mean() - c2)
    assert s2["concept_set"] == "drugs-vs-control" and s2["metric"] == "specificity_delta_nll"
    ratio = lesion_specificity(med, ctl, kind="ratio", n_boot=50)
    assert ratio[ratio["layer"] == 2]["value"].iloc[0] == pytest.approx(
        sel["delta_nll"].mean() / c2
    )


def test_user_errors():
    model = make_tiny("llama")
    with pytest.raises(MedmapError, match="out of range"):
        lesion(model, PROMPTS, TARGETS, layers=[0])
    with pytest.raises(MedmapError, match="out of range"):
        lesion(model, PROMPTS, TARGETS, layers=[3], window=2)
    with pytest.raises(MedmapError, match="window"):
        lesion(model, PROMPTS, TARGETS, window=4)
    with pytest.raises(MedmapError, match="targets"):
        lesion(model, PROMPTS, TARGETS[:2])
    with pytest.raises(MedmapError, match="empty"):
        lesion(model, PROMPTS, ["", "x", "y"])
    assert isinstance(lesion(model, PROMPTS[:1], TARGETS[:1], layers=[1]), pd.DataFrame)
