"""Logit lens: per-layer decoding equals plain transformers, the last layer equals the model's
own forced-choice scores, and emergence is the first layer of a lasting right choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.tiny import make_tiny

from medmap.techniques.logit_lens import emergence_layers, lens_logprobs, logit_lens

PROMPTS = ["Metformin is a first-line treatment for", "The capital of France is"]
ANSWERS = [[" type 2 diabetes", " high cholesterol", " chest pain"], [" Paris", " a mammal"]]


def _manual(model, prompt: str, answer: str) -> np.ndarray:
    """Per residual index, the answer's summed log-probability from plain HF hidden states
    (entries 0..L-1 are the residual stream; pitfalls #1) through the final norm and lm_head."""
    tok = model.tokenizer
    ids = tok(prompt + answer, return_tensors="pt")["input_ids"]
    n_prompt = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        out = model.hf(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    res = []
    torch.set_grad_enabled(False)
    for layer in range(model.n_layers + 1):
        if layer < model.n_layers:
            h = model.hf.model.norm(hs[layer]) if hasattr(model.hf.model, "norm") else None
            logits = model.hf.lm_head(h)
        else:
            logits = out.logits
        lp = torch.log_softmax(logits[0].float(), -1)
        tgt = ids[0, n_prompt:]
        res.append(float(lp[n_prompt - 1 : ids.shape[1] - 1].gather(1, tgt[:, None]).sum()))
    torch.set_grad_enabled(True)
    return np.array(res)


def test_lens_equals_plain_transformers_at_every_layer():
    model = make_tiny("llama", n_layers=3)
    got = lens_logprobs(model, PROMPTS, ANSWERS, batch_size=2)  # batches mix the two prompts
    assert [g.shape for g in got] == [(4, 3), (4, 2)]
    for i, (p, cands) in enumerate(zip(PROMPTS, ANSWERS)):
        for j, a in enumerate(cands):
            np.testing.assert_allclose(got[i][:, j], _manual(model, p, a), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_last_layer_equals_forced_choice_scores(arch):
    from medmap.techniques.knowledge import score_candidates

    model = make_tiny(arch, n_layers=2)
    got = lens_logprobs(model, PROMPTS, ANSWERS, layers=[0, 2])
    ref = score_candidates(model, PROMPTS, ANSWERS)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g[-1], r["logprob"].to_numpy(), rtol=1e-4, atol=1e-4)
    # the embedding layer decodes something else (a random model: not the output)
    assert not np.allclose(got[0][0], got[0][-1])


def test_emergence_layers():
    c = np.array(
        [
            [0, 0, 1, 1],
            [1, 0, 0, 1],
            [1, 1, 1, 0],
            [1, 1, 0, 1],
        ],
        dtype=bool,
    )  # rows = layers 0, 10, 20, 30; columns = targets
    got = emergence_layers(c, [0, 10, 20, 30])
    # right from layer 10 on; from 20 on; wrong at the last layer; right at 0, 10, 30 -> 30
    np.testing.assert_array_equal(got[:3], [10.0, 20.0, np.nan])
    assert got[3] == 30.0
    assert emergence_layers(np.ones((3, 1), bool), [0, 1, 2])[0] == 0.0


def test_logit_lens_rows_on_a_concept_set():
    model = make_tiny("llama", n_layers=2)
    t = logit_lens(model, "drugs", max_items=5, max_targets=1, n_boot=50)
    acc = t[t.metric == "lens_accuracy"].sort_values("layer")
    assert list(acc.layer) == [0, 1, 2]
    assert ((acc.value >= 0) & (acc.value <= 1)).all()
    assert (acc.baseline > 0).all() and (acc.baseline < 1).all()
    assert (acc.ci_low <= acc.value).all() and (acc.value <= acc.ci_high).all()
    em = t[t.metric.isin(["emergence_layer", "emergence_depth"])]
    assert set(em.layer) == {-1}
    # accuracy at the last layer is the model's own forced choice
    from medmap.techniques.knowledge import forced_choices, score_candidates
    from medmap.techniques.logit_lens import _targets

    _, targets = _targets("drugs", 5, 1, 0)
    real, _, _ = forced_choices(targets)
    keep = [i for i, c in enumerate(real) if c is not None and c.distractors]
    ref = score_candidates(model, [targets[i].prompt for i in keep], [real[i].candidates for i in keep])  # fmt: skip
    right = [
        r["logprob"].iloc[: len(real[i].accepted)].max()
        > r["logprob"].iloc[len(real[i].accepted) :].max()
        for i, r in zip(keep, ref)
    ]
    assert acc.value.iloc[-1] == pytest.approx(np.mean(right))


def test_logit_lens_technique_cell(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import medmap.techniques.logit_lens as ll
    from medmap.concepts import load_concepts
    from medmap.techniques.base import Cell, Technique
    from medmap.techniques.logit_lens import LogitLensTechnique

    tech = LogitLensTechnique()
    assert isinstance(tech, Technique) and tech.name == "logit_lens"
    cfg = SimpleNamespace(n_boot=20, seed=0, batch_size=8, max_items=4, knows_distractors=4)
    ctx = SimpleNamespace(
        config=cfg,
        load_set=lambda spec, t: load_concepts(spec).subset(4, seed=0),
        trim_targets=lambda cs: cs,
        run=SimpleNamespace(cells_dir=lambda tech, cell: tmp_path / tech / cell),
    )
    model = make_tiny("llama", n_layers=2)
    t = tech.run_cell(model, Cell("logit_lens", "drugs", "drugs"), ctx)
    assert set(t.metric) == {"lens_accuracy", "lens_margin", "emergence_layer", "emergence_depth"}
    assert (t.technique == "logit_lens").all()
    assert set(t.lens) == {"logit", "tuned"}
    cache = tmp_path / "logit_lens" / "tuned_lens" / "translators.safetensors"
    assert cache.exists()
    # a later cell reads the run's translators instead of fitting them again
    monkeypatch.setattr(ll, "fit_tuned_lens", lambda *a, **k: pytest.fail("refitted"))
    again = tech.run_cell(model, Cell("logit_lens", "drugs", "drugs"), ctx)
    assert again["value"].equals(t["value"])


def _final_resid(model, ids):
    """The last block's output (the final norm's input) by a plain forward pre-hook, and the
    HF hidden states (entries 0..L-1 are the residual stream)."""
    got = {}
    h = model.hf.model.norm.register_forward_pre_hook(lambda m, a: got.update(x=a[0].detach()))
    try:
        with torch.no_grad():
            out = model.hf(input_ids=ids, output_hidden_states=True)
    finally:
        h.remove()
    return out.hidden_states, got["x"]


def test_tuned_lens_is_the_least_squares_translator():
    """Planted answer: the translators equal ordinary least squares of the last block's output
    on [h_l, 1] over every token but the first, computed from plain HF hidden states."""
    from medmap.techniques.lesioning import neutral_sentences
    from medmap.techniques.logit_lens import fit_tuned_lens

    model = make_tiny("llama", n_layers=3)
    texts = neutral_sentences(60)
    a = fit_tuned_lens(model, texts, ridge=0.0, batch_size=7)
    n, d = model.n_layers, model.d_model
    assert a.shape == (n, d + 1, d)
    xs = [[] for _ in range(n)]
    ys = []
    for text in texts:
        ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
        hs, final = _final_resid(model, ids)
        ys.append(final[0, 1:].double())
        for layer in range(n):
            xs[layer].append(hs[layer][0, 1:].double())
    y = torch.cat(ys).numpy()
    assert len(y) > 2 * (d + 1)  # an over-determined fit
    for layer in range(n):
        x = torch.cat(xs[layer]).numpy()
        x1 = np.hstack([x, np.ones((len(x), 1))])
        want = np.linalg.lstsq(x1, y, rcond=None)[0]
        np.testing.assert_allclose(a[layer].numpy(), want, rtol=1e-3, atol=1e-3)
        if layer == 0:
            continue
        # it predicts the last block's output better than the identity (the logit lens)
        pred = x1 @ want
        assert ((pred - y) ** 2).sum() < ((x - y) ** 2).sum()


def test_tuned_lens_rows_beside_the_logit_lens():
    from medmap.techniques.logit_lens import fit_tuned_lens

    model = make_tiny("llama", n_layers=2)
    a = fit_tuned_lens(model)
    both = logit_lens(model, "drugs", max_items=5, max_targets=1, n_boot=50, translators=a)
    plain = logit_lens(model, "drugs", max_items=5, max_targets=1, n_boot=50)
    logit = both[both.lens == "logit"].reset_index(drop=True)
    np.testing.assert_allclose(logit["value"], plain["value"])  # unchanged by the tuned lens
    tuned = both[both.lens == "tuned"].set_index(["metric", "layer"])["value"]
    lg = logit.set_index(["metric", "layer"])["value"]
    assert tuned[("lens_accuracy", 2)] == lg[("lens_accuracy", 2)]  # the model's own output
    assert tuned[("lens_margin", 0)] != lg[("lens_margin", 0)]  # earlier layers: translated
    # the emergence map reads the logit lens only
    from medmap.analysis.maps import emergence_rows

    em = emergence_rows(both)
    assert len(em) == len(logit[logit.metric == "lens_accuracy"])


def test_report_shows_both_lenses():
    from medmap.report.html import emergence_html
    from medmap.techniques.logit_lens import fit_tuned_lens

    model = make_tiny("llama", n_layers=2)
    t = logit_lens(model, "drugs", max_items=5, max_targets=1, n_boot=20,
                   translators=fit_tuned_lens(model, batch_size=32))  # fmt: skip
    html = emergence_html(t)
    assert "logit lens: emergence depth" in html and "tuned lens: emergence depth" in html
    assert "<td>drugs</td>" in html
    assert emergence_html(t[t.technique != "logit_lens"]) == ""
