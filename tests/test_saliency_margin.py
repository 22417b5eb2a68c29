"""Saliency of the forced-choice margin beside the NLL (issue 15, item 3).

The margin loss equals a hand computation (one plain forward per sequence); its hook-reduced
gradients equal a plain ``backward`` of ``-margin``; the NLL rows and their cache keys are as
before the margin existed; the runner gives rows of both objectives, never pooled.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medmap.errors import MedmapError
from medmap.run.cells import cell_key, model_identity
from medmap.techniques.saliency import (
    answer_logprobs,
    item_loss,
    margin_loss,
    param_groups,
    saliency_items,
    saliency_specificity,
    saliency_summary,
)
from tiny import make_tiny, tokenizer

PROMPTS = ["A 47-year-old woman presents with", "Metformin is a first-line treatment for"]
ANSWERS = [" chest pain", " type 2 diabetes"]
# distractors of different token lengths, so the padded pass has ragged rows
DISTRACTORS = [
    [" shortness of breath and swollen ankles", " high cholesterol", " Paris"],
    [" chronic kidney disease", " a statin", " chest pain radiating to the left arm"],
]


def _hand_logprob(model, prompt: str, answer: str) -> torch.Tensor:
    """log p(answer | prompt) from its own unpadded forward pass (plain transformers)."""
    enc = tokenizer()(prompt + answer, return_offsets_mapping=True, return_tensors="pt")
    ids = enc["input_ids"]
    offsets = enc["offset_mapping"][0].tolist()
    target = [t for t, (a, b) in enumerate(offsets) if b > a and b > len(prompt)]
    logp = torch.log_softmax(model.hf(input_ids=ids).logits[0].float(), -1)
    return sum(logp[t - 1, ids[0, t]] for t in target)


def _hand_margin_loss(model, prompt, answer, distractors) -> torch.Tensor:
    lp_a = _hand_logprob(model, prompt, answer)
    lp_d = torch.stack([_hand_logprob(model, prompt, d) for d in distractors])
    return lp_d.max() - lp_a


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_margin_loss_equals_separate_forward_passes(arch):
    model = make_tiny(arch, seed=20)
    with torch.no_grad():
        for p, a, ds in zip(PROMPTS, ANSWERS, DISTRACTORS):
            got = answer_logprobs(model, p, [a, *ds])
            want = torch.stack([_hand_logprob(model, p, x) for x in [a, *ds]])
            assert got.shape == (4,)
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5)
            loss = margin_loss(model, p, a, ds)
            ref = _hand_margin_loss(model, p, a, ds)
            assert float(loss) == pytest.approx(float(ref), abs=1e-5)
            # random weights: the distractors' log-probabilities differ, so the max is a choice
            assert len({round(float(x), 3) for x in want[1:]}) == 3
            # the answer's log-probability is minus its NLL (the same tokens as item_loss)
            assert float(got[0]) == pytest.approx(-float(item_loss(model, p, a)), abs=1e-5)


def test_margin_loss_equals_the_knows_stage_margin():
    """The knows stage scores the same candidates (with a KV cache): the same margin."""
    from medmap.techniques.knowledge import score_candidates

    model = make_tiny("qwen2", seed=21)
    scored = score_candidates(model, PROMPTS, [[a, *d] for a, d in zip(ANSWERS, DISTRACTORS)])
    for p, a, ds, df in zip(PROMPTS, ANSWERS, DISTRACTORS, scored):
        lp = df["logprob"].to_numpy()
        with torch.no_grad():
            loss = float(margin_loss(model, p, a, ds))
        assert -loss == pytest.approx(lp[0] - lp[1:].max(), abs=1e-4)


def _plain_backward(model, prompt, answer, distractors) -> dict[tuple[int, str], float]:
    """``-margin`` by hand, plain ``loss.backward()`` keeping every gradient, then
    ``sum |w * grad|`` per (layer, module) and per block."""
    pg = param_groups(model)
    for p in pg.params:
        p.requires_grad_(True)
        p.grad = None
    loss = _hand_margin_loss(model, prompt, answer, distractors)
    loss.backward()
    out: dict[tuple[int, str], float] = {}
    for p, g in zip(pg.params, pg.group_of):
        for key in [g] + ([(g[0], "block")] if g[0] > 0 else []):
            out[key] = (
                out.get(key, 0.0) + (p.grad.double() * p.detach().double()).abs().sum().item()
            )
    for p in pg.params:
        p.grad = None
        p.requires_grad_(False)
    return out, float(loss.detach())


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_margin_gradients_equal_plain_autograd(arch):
    model = make_tiny(arch, seed=22)
    model.hf.requires_grad_(False)
    df = saliency_items(
        model, PROMPTS, ANSWERS, distractors=DISTRACTORS, objective="margin", item_ids=["a", "b"]
    )
    assert (df["objective"] == "margin").all()
    assert list(df.columns[:5]) == ["model", "concept_set", "n_layers", "objective", "item"]
    for i, (p, a, ds) in enumerate(zip(PROMPTS, ANSWERS, DISTRACTORS)):
        ref, ref_loss = _plain_backward(model, p, a, ds)
        rows = df[df["item"] == i].set_index(["layer", "module"])
        assert set(rows.index) == set(ref)
        assert rows["loss"].iloc[0] == pytest.approx(ref_loss, abs=1e-5)  # loss = -margin
        for key, sgw in ref.items():
            np.testing.assert_allclose(rows.loc[key, "grad_x_weight_sum"], sgw, rtol=1e-5)
    # the margin's gradients are not the NLL's
    nll = saliency_items(model, PROMPTS, ANSWERS)
    a = df[df["module"] == "block"]["grad_x_weight_share"].to_numpy()
    b = nll[nll["module"] == "block"]["grad_x_weight_share"].to_numpy()
    assert np.abs(a - b).max() > 1e-3
    assert not any(p.requires_grad for p in model.hf.parameters())
    assert all(p.grad is None for p in model.hf.parameters())


def test_nll_rows_and_cache_keys_are_unchanged(tmp_path):
    model = make_tiny("llama", seed=23)
    plain = saliency_items(model, PROMPTS, ANSWERS, cache_dir=tmp_path)
    # the NLL objective ignores distractors and gives the same rows
    again = saliency_items(
        model, PROMPTS, ANSWERS, distractors=DISTRACTORS, objective="nll", cache_dir=tmp_path
    )
    pd.testing.assert_frame_equal(plain, again)
    assert (plain["objective"] == "nll").all()
    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        loss = plain[plain["item"] == i]["loss"].iloc[0]
        assert loss == pytest.approx(float(item_loss(model, p, a).detach()), abs=1e-6)
    # the NLL cell is stored under the key of before the margin existed, without the new column
    key = cell_key(
        technique="saliency",
        model=model_identity(model),
        concept_set="custom",
        prompts=PROMPTS,
        targets=ANSWERS,
        ids=["0", "1"],
    )
    stored = sorted(tmp_path.glob("*.parquet"))
    assert [f.name for f in stored] == [f"saliency-{key}.parquet"]
    old = pd.read_parquet(stored[0])
    assert "objective" not in old.columns  # a cell written before the margin reads the same
    pd.testing.assert_frame_equal(old, plain.drop(columns="objective"))
    # the margin gets its own cell
    saliency_items(
        model, PROMPTS, ANSWERS, distractors=DISTRACTORS, objective="margin", cache_dir=tmp_path
    )
    assert len(list(tmp_path.glob("*.parquet"))) == 2


def test_summary_never_pools_objectives():
    model = make_tiny("gpt2", seed=24)
    nll = saliency_items(model, PROMPTS, ANSWERS)
    mar = saliency_items(model, PROMPTS, ANSWERS, distractors=DISTRACTORS, objective="margin")
    # drop one item of the margin run: the two objectives then have different counts
    mar1 = mar[mar["item"] == 0]
    tidy = saliency_summary(pd.concat([nll, mar1], ignore_index=True), n_boot=20)
    assert set(tidy["objective"]) == {"nll", "margin"}
    sel = (tidy["module"] == "block") & (tidy["layer"] == 2)
    sel &= tidy["metric"] == "grad_x_weight_share"
    got = tidy[sel].set_index("objective")
    assert got.loc["nll", "n"] == 2 and got.loc["margin", "n"] == 1
    blk = (nll["module"] == "block") & (nll["layer"] == 2)
    assert got.loc["nll", "value"] == pytest.approx(nll[blk]["grad_x_weight_share"].mean())
    blk = (mar1["module"] == "block") & (mar1["layer"] == 2)
    assert got.loc["margin", "value"] == pytest.approx(mar1[blk]["grad_x_weight_share"].iloc[0])
    # a frame of before the margin (no objective column) is NLL, with the same values
    old = saliency_summary(nll.drop(columns="objective"), n_boot=20)
    pd.testing.assert_frame_equal(old, saliency_summary(nll, n_boot=20))
    # specificity compares one objective, never a pooled frame
    both = pd.concat([nll, mar], ignore_index=True)
    with pytest.raises(MedmapError, match="several objectives"):
        saliency_specificity(both, nll, n_boot=20)
    ctl = saliency_items(
        model,
        ["The capital of France is"],
        [" Paris"],
        distractors=[[" a dog", " a mammal"]],
        objective="margin",
        concept_set="geo",
    )
    spec = saliency_specificity(both, pd.concat([nll, ctl]), objective="margin", n_boot=20)
    m2 = mar[(mar["module"] == "block") & (mar["layer"] == 2)]["grad_x_weight_share"].mean()
    c2 = ctl[(ctl["module"] == "block") & (ctl["layer"] == 2)]["grad_x_weight_share"].mean()
    assert spec[spec["layer"] == 2]["value"].iloc[0] == pytest.approx(m2 - c2)


def test_margin_needs_distractors_for_every_item():
    model = make_tiny("llama", seed=25)
    with pytest.raises(MedmapError, match="'margin' needs distractors"):
        saliency_items(model, PROMPTS, ANSWERS, objective="margin")
    with pytest.raises(MedmapError, match="item 'b' has no distractors"):
        saliency_items(
            model,
            PROMPTS,
            ANSWERS,
            item_ids=["a", "b"],
            distractors=[DISTRACTORS[0], []],
            objective="margin",
        )
    with pytest.raises(MedmapError, match="unknown saliency objective 'loss'"):
        saliency_items(model, PROMPTS, ANSWERS, objective="loss")
    with pytest.raises(MedmapError, match="target 1 is empty"):
        saliency_items(
            model, PROMPTS, ANSWERS, distractors=[[" x"], [" y", ""]], objective="margin"
        )


def test_runner_gives_rows_of_both_objectives(tmp_path):
    from medmap.concepts import load_concepts
    from medmap.run.config import RunConfig
    from medmap.run.execute import model_for
    from medmap.run.runner import run_map
    from medmap.techniques.concept_io import concept_targets
    from medmap.techniques.knowledge import forced_choices
    from tiny import make_hf

    d = tmp_path / "tiny-llama"
    make_hf("llama", n_layers=3, seed=26).save_pretrained(d)
    tokenizer().save_pretrained(d)
    cfg = RunConfig(
        model=str(d),
        concept_sets=["progression"],
        techniques=["saliency"],
        known_only=False,  # a random model knows nothing
        max_items=4,
        max_targets=1,
        saliency_items=2,
        n_boot=10,
        batch_size=8,
        umap=False,
    )
    assert "knows" not in cfg.techniques
    out = run_map(cfg, tmp_path / "run", report=False, item_detail=True)
    part = pd.read_parquet(out / "parts" / "saliency" / "progression.parquet")
    assert set(part["objective"]) == {"nll", "margin"}
    items = pd.read_parquet(out / "parts" / "items" / "saliency" / "progression.parquet")
    # the margin rows are the direct margin saliency with the knows stage's candidates
    model = model_for(cfg)
    full = load_concepts("progression")
    full = full.model_copy(
        update={"items": [it.model_copy(update={"targets": it.targets[:1]}) for it in full.items]}
    )
    targets = list(full.targets())
    real, _, _ = forced_choices(targets, max_distractors=cfg.knows_distractors, seed=cfg.seed)
    choice = {f"{t.item_id}/{t.target_id}": c for t, c in zip(targets, real)}
    ct = concept_targets(full.subset(4, seed=0), 2)  # trimmed, then max_items
    keep = [k for k, i in enumerate(ct.ids) if choice[i].distractors]
    assert keep, "the progression set has distractors"
    want = saliency_items(
        model,
        [ct.prompts[k] for k in keep],
        [choice[ct.ids[k]].accepted[0] for k in keep],
        item_ids=[ct.ids[k] for k in keep],
        distractors=[choice[ct.ids[k]].distractors for k in keep],
        objective="margin",
        concept_set="progression",
    )
    got = items[items["objective"] == "margin"].reset_index(drop=True)
    assert list(got["item_id"].unique()) == [ct.ids[k] for k in keep]
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["grad_x_weight_share"], want["grad_x_weight_share"], rtol=1e-6)
    # the NLL rows are the NLL of the same (first accepted) answers
    nll = items[items["objective"] == "nll"]
    assert list(nll["item_id"].unique()) == ct.ids
    # the summary rows of each objective count that objective's items
    blk = part[(part["module"] == "block") & (part["metric"] == "grad_x_weight_share")]
    assert set(blk[blk["objective"] == "nll"]["n"]) == {len(ct.ids)}
    assert set(blk[blk["objective"] == "margin"]["n"]) == {len(keep)}
