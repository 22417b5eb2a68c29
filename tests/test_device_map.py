"""A model split over devices by accelerate (CPU + disk offload) gives the same numbers as unsplit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medmap
from medmap.hooks import SkipBlocks
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
