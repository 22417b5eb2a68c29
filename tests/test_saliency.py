"""Weight-gradient saliency: hook-reduced per-item gradients equal a plain backward, in less memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmap.analysis.results import COLUMNS
from medmap.model.targets import encode_targets
from medmap.techniques import (
    saliency_items,
    saliency_specificity,
    saliency_summary,
    weight_saliency,
)
from medmap.techniques.saliency import param_groups
from tiny import CAUSAL_ARCHS, make_tiny

PROMPTS = ["A 47-year-old woman presents with", "Metformin is a first-line treatment for"]
TARGETS = [" chest pain", " type 2 diabetes"]


def _reference(model, prompt: str, target: str) -> dict[tuple[int, str], tuple[float, float]]:
    """Plain full backward (all gradients kept), reduced per (layer, module) afterwards."""
    pg = param_groups(model)
    for p in pg.params:
        p.requires_grad_(True)
        p.grad = None
    batch, spans = encode_targets(model.tokenizer, [prompt], [target])
    s = spans[0]
    logits = model.hf(**batch.model_inputs()).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    loss = -sum(logp[t - 1, s.ids[t]] for t in range(s.start, s.stop))
    loss.backward()
    out: dict[tuple[int, str], list[float]] = {}
    for p, g in zip(pg.params, pg.group_of):
        keys = [g] + ([(g[0], "block")] if g[0] > 0 else [])
        for key in keys:
            acc = out.setdefault(key, [0.0, 0.0])
            acc[0] += p.grad.double().abs().sum().item()
            acc[1] += (p.grad.double() * p.detach().double()).abs().sum().item()
    for p in pg.params:
        p.grad = None
        p.requires_grad_(False)
    return {k: tuple(v) for k, v in out.items()}


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_hook_reduction_equals_plain_backward(arch):
    model = make_tiny(arch, seed=10)
    model.hf.requires_grad_(False)
    df = saliency_items(model, PROMPTS, TARGETS)
    pg = param_groups(model)
    numel = {}
    for p, g in zip(pg.params, pg.group_of):
        numel[g] = numel.get(g, 0) + p.numel()
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        ref = _reference(model, p, t)
        tot_g = sum(v[0] for k, v in ref.items() if k[1] != "block")
        tot_gw = sum(v[1] for k, v in ref.items() if k[1] != "block")
        rows = df[df["item"] == i].set_index(["layer", "module"])
        assert set(rows.index) == set(ref)
        for key, (sg, sgw) in ref.items():
            r = rows.loc[key]
            np.testing.assert_allclose(r["grad_abs_sum"], sg, rtol=1e-5)
            np.testing.assert_allclose(r["grad_x_weight_sum"], sgw, rtol=1e-5)
            np.testing.assert_allclose(r["grad_abs_share"], sg / tot_g, rtol=1e-5)
            np.testing.assert_allclose(r["grad_x_weight_share"], sgw / tot_gw, rtol=1e-5)
            if key[1] != "block":
                np.testing.assert_allclose(r["grad_abs_mean"], sg / numel[key], rtol=1e-5)
        parts = rows[rows.index.get_level_values("module") != "block"]
        assert parts["grad_abs_share"].sum() == pytest.approx(1.0)
        assert parts["grad_x_weight_share"].sum() == pytest.approx(1.0)
        for b in range(1, model.n_layers + 1):
            inner = parts[parts.index.get_level_values("layer") == b]
            assert rows.loc[(b, "block"), "grad_abs_sum"] == pytest.approx(
                inner["grad_abs_sum"].sum()
            )
    # requires_grad restored, nothing left behind
    assert not any(p.requires_grad for p in model.hf.parameters())
    assert all(p.grad is None for p in model.hf.parameters())


def test_peak_gradient_memory_is_one_tensor_not_all():
    model = make_tiny("llama", seed=11)
    df = saliency_items(model, PROMPTS, TARGETS)
    biggest = max(p.numel() * p.element_size() for p in model.hf.parameters())
    total = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    assert df.attrs["total_grad_bytes"] == total
    assert df.attrs["peak_grad_bytes"] == biggest
    assert df.attrs["peak_grad_bytes"] < total / 4
    # a plain backward keeps every gradient alive at the end
    _reference_live = []
    for p in model.hf.parameters():
        p.requires_grad_(True)
    batch, spans = encode_targets(model.tokenizer, PROMPTS[:1], TARGETS[:1])
    model.hf(**batch.model_inputs()).logits.sum().backward()
    _reference_live = sum(p.grad.numel() * p.grad.element_size() for p in model.hf.parameters())
    assert _reference_live == total > df.attrs["peak_grad_bytes"]
    model.hf.zero_grad(set_to_none=True)


def test_tied_embedding_reported_once():
    model = make_tiny("gemma3_text", seed=12)  # ties embedding and output matrix
    assert model.hf.lm_head.weight is model.hf.model.embed_tokens.weight
    df = saliency_items(model, PROMPTS[:1], TARGETS[:1])
    assert "unembedding" not in set(df["module"])
    emb = df[df["module"] == "embedding"].iloc[0]
    assert emb["numel"] == model.hf.lm_head.weight.numel()
    assert set(df["module"]) == {"embedding", "attention", "mlp", "norm", "block", "final_norm"}


def test_tidy_summary_and_specificity():
    model = make_tiny("qwen2", seed=13)
    tidy = weight_saliency(model, PROMPTS, TARGETS, concept_set="drugs", n_boot=50)
    assert list(tidy.columns[: len(COLUMNS)]) == COLUMNS
    assert (tidy["technique"] == "saliency").all()
    assert set(tidy["metric"]) == {
        "grad_abs_mean",
        "grad_x_weight_mean",
        "grad_abs_share",
        "grad_x_weight_share",
    }
    assert set(tidy["module"]) == {
        "embedding",
        "attention",
        "mlp",
        "norm",
        "block",
        "final_norm",
        "unembedding",
    }
    emb = tidy[tidy["module"] == "embedding"]
    assert (emb["layer"] == 0).all() and (emb["relative_depth"] == 0).all()
    assert (tidy[tidy["module"] == "final_norm"]["layer"] == -1).all()
    blk = tidy[(tidy["module"] == "block") & (tidy["metric"] == "grad_x_weight_share")]
    assert sorted(blk["layer"]) == [1, 2, 3]
    assert (blk["n"] == 2).all()
    items = saliency_items(model, PROMPTS, TARGETS, concept_set="drugs")
    ctl = saliency_items(model, ["The capital of France is"], [" Paris"], concept_set="geo")
    summ = saliency_summary(items, n_boot=50)
    assert summ["value"].tolist() == pytest.approx(tidy["value"].tolist())
    spec = saliency_specificity(items, ctl, n_boot=50)
    m2 = items[(items["module"] == "block") & (items["layer"] == 2)]["grad_x_weight_share"].mean()
    c2 = ctl[(ctl["module"] == "block") & (ctl["layer"] == 2)]["grad_x_weight_share"].mean()
    assert spec[spec["layer"] == 2]["value"].iloc[0] == pytest.approx(m2 - c2)
