"""A model split over devices by accelerate (CPU + disk offload) gives the same numbers as unsplit."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import medmap
from medmap.model.sites import SkipBlocks
from tiny import make_hf, tokenizer

PROMPTS = ["A 47-year-old woman presents with chest pain radiating to the left arm.", "Hi there"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    make_hf("llama", n_layers=4).save_pretrained(d / "m")
    tokenizer().save_pretrained(d / "m")
    plain = medmap.load_model(d / "m", attn_implementation="eager")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.layers.3": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    split = medmap.load_model(
        d / "m", device_map=device_map, offload_folder=d / "offload", attn_implementation="eager"
    )
    return plain, split


def test_split_model_is_really_offloaded(models):
    _, split = models
    assert split.hf.hf_device_map["model.layers.1"] == "disk"
    assert split.adapter.blocks[1].self_attn.q_proj.weight.device.type == "meta"


def test_capture_same_as_unsplit(models):
    plain, split = models
    np.testing.assert_array_equal(medmap.capture(split, PROMPTS), medmap.capture(plain, PROMPTS))


def test_lesion_hook_same_as_unsplit(models):
    plain, split = models
    enc = plain.tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        with SkipBlocks(split.adapter, [1]):
            a = split.hf(**enc).logits
        with SkipBlocks(plain.adapter, [1]):
            b = plain.hf(**enc).logits
    assert torch.equal(a, b)


def test_lesion_sweep_same_as_unsplit(models):
    from medmap.techniques import lesion

    plain, split = models
    prompts = ["Metformin is a first-line treatment for", "The capital of France is"]
    targets = [" type 2 diabetes", " Paris"]
    a = lesion(split, prompts, targets)
    b = lesion(plain, prompts, targets)
    assert len(a) == 4 * 2
    np.testing.assert_allclose(a["nll_lesioned"], b["nll_lesioned"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a["nll_base"], b["nll_base"], rtol=1e-6, atol=1e-6)


def test_patching_same_as_unsplit(models):
    from medmap.techniques import patch

    plain, split = models
    tok = plain.tokenizer
    clean, corrupt = "The patient is 47 years old.", "The patient is 80 years old."
    assert len(tok(clean)["input_ids"]) == len(tok(corrupt)["input_ids"])
    kw = dict(
        clean_prompts=[clean],
        corrupt_prompts=[corrupt],
        clean_targets=[" chest"],
        corrupt_targets=[" breath"],
        positions=["last", "all"],
    )
    a, b = patch(split, **kw), patch(plain, **kw)
    assert len(a) == 5 * 2
    for col in ("logit_diff_patched", "logit_diff_clean", "logit_diff_corrupt"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-6, atol=1e-6)


def test_saliency_same_as_unsplit(models):
    """Offloaded weights' gradients are taken from accelerate's per-forward copies: same sums."""
    from medmap.techniques.saliency import saliency_items

    plain, split = models
    prompts = ["Metformin is a first-line treatment for", "The capital of France is"]
    targets = [" type 2 diabetes", " Paris"]
    a = saliency_items(split, prompts, targets)
    b = saliency_items(plain, prompts, targets)
    assert len(a) == len(b) > 0
    a, b = (x.set_index(["item", "layer", "module"]).sort_index() for x in (a, b))
    assert list(a.index) == list(b.index)
    for col in ("loss", "grad_abs_sum", "grad_x_weight_sum", "grad_x_weight_share"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-5)
    # the offloaded blocks really carry gradient (not zeros that would also "match" zeros)
    for layer in (2, 3):  # blocks 1 and 2 are on disk
        assert a.loc[(0, layer, "block"), "grad_abs_sum"] > 0
    # hooks and wrappers gone, flags restored, weights still offloaded
    blk = split.adapter.blocks[1]
    assert blk.self_attn.q_proj.weight.device.type == "meta"
    assert not any(p.requires_grad for p in split.hf.parameters())
    q = blk.self_attn.q_proj
    assert inspect.ismethod(q._old_forward) and q._old_forward.__self__ is q


def test_offloaded_blocks_get_no_gradient_without_the_forward_wrappers(models):
    """Why GradReducer wraps accelerate's forwards: hooks on the parameters alone miss them."""
    from medmap.techniques.saliency import item_loss, param_groups
    from medmap.techniques.saliency.gradstats import GradReducer

    _, split = models
    pg = param_groups(split)
    for p in pg.params:
        p.requires_grad_(True)
    try:
        sums = {}
        for label, args in (
            ("params only", ()),
            ("with wrappers", (split.hf, pg.aliases)),
        ):
            with GradReducer(pg.params, *args) as reducer, torch.enable_grad():
                item_loss(split, "The capital of France is", " Paris").backward()
                sums[label] = reducer.take()[0]
        on_disk = np.array([g[0] in (2, 3) for g in pg.group_of])
        assert sums["params only"][on_disk].sum() == 0
        assert (sums["with wrappers"][on_disk] > 0).all()
        np.testing.assert_array_equal(
            sums["params only"][~on_disk], sums["with wrappers"][~on_disk]
        )
    finally:
        for p in split.hf.parameters():
            p.requires_grad_(False)
