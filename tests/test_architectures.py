"""Adapter, named sites, and sub-module lesioning/patching on tiny models of every architecture.

Every value is checked against plain transformers: the sub-module's ``forward`` replaced by hand
(monkeypatched on the instance), the logits taken from ``model.hf(...).logits``.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from medmap.model.sites import Site, Trace, count_hooks
from medmap.model.targets import encode_targets, prediction_index, target_scores
from medmap.model.tokens import encode
from medmap.techniques import answer_token, lesion, patch
from tiny import ALL_ARCHS, MOE_ARCHS, make_tiny

PROMPTS = ["Metformin is a first-line treatment for", "The capital of France is"]
TARGETS = [" type 2 diabetes", " Paris"]
CLEAN = ["The patient took insulin for", "A dog is a"]
CORRUPT = ["The patient took aspirin for", "A cat is a"]
CLEAN_ANS = [" diabetes", " mammal"]
CORRUPT_ANS = [" pain", " pet"]
# post-sub-module norms: the block adds norm(sub-module output) to the residual stream
POST_NORMS = {
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
}


@pytest.fixture(scope="module", params=ALL_ARCHS)
def model(request):
    return make_tiny(request.param, seed=3)


def _arch(model) -> str:
    return model.name.split("-")[1].rsplit("-s", 1)[0]


@contextmanager
def hand_forward(module, change):
    """``module.forward`` replaced by ``change(output)`` of the original (instance attribute)."""
    orig = module.forward

    def forward(*args, **kwargs):
        out = orig(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        new = change(h)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    module.forward = forward
    try:
        yield
    finally:
        del module.forward


def _sub(model, site: str, b: int):
    return model.adapter.attn(b) if site == "attn" else model.adapter.mlp(b)


def test_adapter_parts_and_logits(model):
    ad, hf = model.adapter, model.hf
    assert ad.base is getattr(hf, hf.base_model_prefix)
    batch = encode(model.tokenizer, PROMPTS)
    inp = batch.model_inputs()
    with torch.no_grad(), Trace(ad, [f"resid_post.{ad.n_layers - 1}"]) as tr:
        full = hf(**inp).logits
    resid = tr[f"resid_post.{ad.n_layers - 1}"]
    last = torch.tensor([n - 1 for n in batch.lengths])
    torch.testing.assert_close(
        ad.logits(resid, last), full[torch.arange(2), last], rtol=1e-5, atol=1e-5
    )
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 3])
    torch.testing.assert_close(
        ad.logits(resid, (rows, cols)), full[rows, cols], rtol=1e-5, atol=1e-5
    )
    with torch.no_grad():
        normed = ad.base(**inp).last_hidden_state
    torch.testing.assert_close(ad.logits(normed, last, normed=True), full[torch.arange(2), last])
    # every parameter has a kind from the module tree; blocks hold attention and MLP weights
    kinds = {n: ad.param_kind(n) for n, _ in hf.named_parameters()}
    assert "other" not in kinds.values()
    for b in range(ad.n_layers):
        attn_params = {id(p) for p in ad.attn(b).parameters()}
        assert attn_params and all(
            kinds[n] == "attn" for n, p in hf.named_parameters() if id(p) in attn_params
        )
    moe = _arch(model) in MOE_ARCHS
    assert ("expert" in kinds.values()) == moe and ("router" in kinds.values()) == moe
    if moe:
        assert ad.n_experts == 4
        experts = [n for n, k in kinds.items() if k == "expert"]
        assert all(ad.fused_experts(n) == 4 for n in experts)
        assert all(ad.param_block(n) == int(n.split(".")[2]) for n in experts)
    else:
        assert "mlp" in kinds.values() and ad.n_experts is None


def test_sites_compose_the_block(model):
    """resid_post = resid_pre + attn_out + mlp_out (through the post norms where there are)."""
    ad = model.adapter
    n = ad.n_layers
    sites = [
        f"{k}.{b}" for b in range(n) for k in ("resid_pre", "resid_post", "attn_out", "mlp_out")
    ]
    inp = encode(model.tokenizer, PROMPTS).model_inputs()
    with torch.no_grad():
        plain = model.hf(**inp).logits
        with Trace(ad, sites) as tr:
            traced = model.hf(**inp).logits
    assert torch.equal(plain, traced) and count_hooks(model.hf) == 0
    norms = POST_NORMS.get(_arch(model))
    for b in range(n):
        attn, mlp = tr[f"attn_out.{b}"], tr[f"mlp_out.{b}"]
        if norms:
            blk = ad.blocks[b]
            with torch.no_grad():
                attn, mlp = getattr(blk, norms[0])(attn), getattr(blk, norms[1])(mlp)
        torch.testing.assert_close(
            tr[f"resid_post.{b}"], tr[f"resid_pre.{b}"] + attn + mlp, rtol=1e-5, atol=1e-5
        )
        if b + 1 < n:
            assert torch.equal(tr[f"resid_post.{b}"], tr[f"resid_pre.{b + 1}"])
        assert tr[f"attn_out.{b}"].abs().max() > 0 and tr[f"mlp_out.{b}"].abs().max() > 0
    if norms:  # zeroing the sub-module output zeroes what the block adds (norm of 0 is 0)
        z = torch.zeros(1, 2, ad.d_model)
        for name in norms:
            assert torch.equal(getattr(ad.blocks[0], name)(z), z)


def test_trace_positions_replace_and_stop(model):
    ad = model.adapter
    batch = encode(model.tokenizer, PROMPTS)
    inp = batch.model_inputs()
    last = torch.tensor([n - 1 for n in batch.lengths])
    with torch.no_grad(), Trace(ad, ["mlp_out.1"], positions=last) as tr:
        model.hf(**inp)
    with torch.no_grad(), Trace(ad, ["mlp_out.1"]) as full:
        model.hf(**inp)
    assert torch.equal(tr["mlp_out.1"], full["mlp_out.1"][torch.arange(2), last])
    # replacing at the last positions by hand == Trace(replace=...)
    value = torch.randn_like(full["mlp_out.1"])
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[torch.arange(2), last] = True

    def put(h):
        return torch.where(mask[..., None], value, h)

    with torch.no_grad():
        with hand_forward(ad.mlp(1), put):
            ref = model.hf(**inp).logits
        with Trace(ad, replace={"mlp_out.1": (value, mask)}):
            got = model.hf(**inp).logits
        plain = model.hf(**inp).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)
    # stop_after ends the pass early and the context swallows the stop
    seen = []
    stop = Trace(ad, ["resid_pre.0"], stop_after="attn_out.0")
    with torch.no_grad(), stop, hand_forward(ad.mlp(0), lambda h: seen.append(1) or h):
        model.hf(**inp)
    assert seen == [] and count_hooks(model.hf) == 0


def _hand_nll(model, site, blocks):
    batch, spans = encode_targets(model.tokenizer, PROMPTS, TARGETS)
    rows, cols, _, _ = prediction_index(spans)
    mods = [_sub(model, site, b) for b in blocks]
    with torch.no_grad(), hand_forward(mods[0], torch.zeros_like):
        if len(mods) > 1:
            with hand_forward(mods[1], torch.zeros_like):
                logits = model.hf(**batch.model_inputs()).logits
        else:
            logits = model.hf(**batch.model_inputs()).logits
    return target_scores(logits[rows, cols], spans)["nll"].numpy()


@pytest.mark.parametrize("site", ["attn", "mlp"])
def test_lesion_submodule_equals_hand_zeroed_forward(model, site):
    df = lesion(model, PROMPTS, TARGETS, layers=[1, 2], site=site)
    assert (df["site"] == site).all()
    for layer in (1, 2):
        got = df[df["layer"] == layer]["nll_lesioned"].to_numpy()
        np.testing.assert_allclose(got, _hand_nll(model, site, [layer - 1]), rtol=1e-5, atol=1e-5)
    assert df["delta_nll"].abs().max() > 1e-4  # the lesion matters (the test could fail)
    w2 = lesion(model, PROMPTS, TARGETS, layers=[1], window=2, site=site)
    np.testing.assert_allclose(
        w2["nll_lesioned"].to_numpy(), _hand_nll(model, site, [0, 1]), rtol=1e-5, atol=1e-5
    )
    assert count_hooks(model.hf) == 0


def _hand_patch_ld(model, site, b, i):
    tok = model.tokenizer
    cb, xb = encode(tok, [CLEAN[i]]), encode(tok, [CORRUPT[i]])
    mod = _sub(model, site, b)
    kept = []
    with torch.no_grad(), hand_forward(mod, lambda h: kept.append(h) or h):
        model.hf(**cb.model_inputs())
    clean = kept[0]

    def put(h):
        h = h.clone()
        h[:, -1] = clean[:, -1]
        return h

    with torch.no_grad(), hand_forward(mod, put):
        logits = model.hf(**xb.model_inputs()).logits[0, -1]
    a = answer_token(tok, CLEAN[i], CLEAN_ANS[i])
    c = answer_token(tok, CORRUPT[i], CORRUPT_ANS[i])
    return float(logits[a] - logits[c])


@pytest.mark.parametrize("site", ["attn", "mlp"])
def test_patch_submodule_equals_hand_replaced_forward(model, site):
    df = patch(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, positions=["last", "all"], site=site)
    assert sorted(df["layer"].unique()) == [1, 2, 3] and (df["site"] == site).all()
    last = df[df["position"] == "last"]
    for _, r in last.iterrows():
        ld = _hand_patch_ld(model, site, int(r["layer"]) - 1, int(r["pair"]))
        np.testing.assert_allclose(r["logit_diff_patched"], ld, rtol=1e-4, atol=1e-4)
    assert (last["logit_diff_patched"] - last["logit_diff_corrupt"]).abs().max() > 1e-4
    # one position at a time equals the positions stacked along the batch
    one = patch(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, positions="all", site=site)
    np.testing.assert_allclose(
        one["logit_diff_patched"].to_numpy(),
        df[df["position"] == "all"]["logit_diff_patched"].to_numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
    assert count_hooks(model.hf) == 0


def test_site_names():
    assert Site.parse("attn.3") == Site("attn_out", 3) and str(Site("mlp_out", 2)) == "mlp_out.2"
    assert Site.parse("resid_post.1").resid_index == 2
    from medmap.errors import MedmapError

    with pytest.raises(MedmapError, match="unknown site"):
        Site.parse("heads.2")
    m = make_tiny("llama")
    with pytest.raises(MedmapError, match="block index 3 is out of range"):
        Trace(m.adapter, ["attn_out.3"])
    with pytest.raises(MedmapError, match="site block.1 cannot be read"):
        Trace(m.adapter, ["block.1"])
    with pytest.raises(MedmapError, match="cannot ablate site resid_pre.1"):
        Trace(m.adapter, ablate=["resid_pre.1"])
    with pytest.raises(MedmapError, match="unknown site"):
        lesion(m, PROMPTS, TARGETS, site="heads")
    with pytest.raises(MedmapError, match="patch layer 0 has no attn output"):
        patch(m, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, layers=[0], site="attn")
