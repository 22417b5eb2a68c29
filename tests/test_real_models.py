"""The two bundled real models: GGUF → cached safetensors, exact capture, sensible completions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medmap
from medmap.loading import convert_gguf, gguf_cache_dir
from medmap.registry import BUNDLED_MODELS

pytestmark = pytest.mark.real

VIGNETTE = (
    "A 58-year-old man presents with crushing chest pain radiating to his left arm, sweating and "
    "nausea. The ECG shows ST elevation. The most likely diagnosis is"
)
QA = (
    "Question: A 60-year-old man has sudden crushing chest pain spreading to the left arm and ST "
    "elevation on the ECG. What is the diagnosis?\nAnswer:"
)
CARDIAC = ("myocardial infarction", "heart attack", "coronary", "angina", "stemi")


@pytest.fixture(scope="module", params=sorted(BUNDLED_MODELS))
def model(request):
    convert_gguf(BUNDLED_MODELS[request.param].gguf_path(), progress=False)  # warm the cache
    with pytest.MonkeyPatch.context() as mp:
        # a second load must come from the safetensors cache: GGUF reading would fail here
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        def no_gguf(*a, **k):
            raise AssertionError("the GGUF file was read again instead of the cache")

        mp.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
        m = medmap.load_model(request.param)
    return m


def test_second_load_comes_from_the_cache(model):
    # How long it takes is measured in benchmarks/load.py (BENCHMARKS.md), not here.
    assert model.info["kind"] == "gguf"
    assert model.info["weights_dir"] == str(gguf_cache_dir(BUNDLED_MODELS[model.name].gguf_path()))


def test_cached_weights_bit_identical_to_gguf(model):
    from transformers import AutoModelForCausalLM

    gguf = BUNDLED_MODELS[model.name].gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    direct.eval()
    enc = model.tokenizer(VIGNETTE, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(direct(**enc).logits, model.hf(**enc).logits)
    cached = dict(model.hf.named_parameters())
    for name, p in direct.named_parameters():
        assert torch.equal(p, cached[name]), name


def test_capture_agrees_with_hf(model):
    prompts = [VIGNETTE, "Metformin is a first-line treatment for", "A 7-year-old boy has a fever."]
    acts = medmap.capture(model, prompts, batch_size=3)
    assert acts.shape == (3, model.n_layers + 1, model.d_model)
    for i, p in enumerate(prompts):
        enc = model.tokenizer(p, return_tensors="pt")
        with torch.no_grad():
            hs = model.hf(**enc, output_hidden_states=True).hidden_states
        ref = torch.stack([h[0, -1] for h in hs[:-1]]).numpy()
        scale = np.abs(ref).max()
        # Batched matmuls round differently from single ones: compare relative to the scale.
        assert np.abs(acts[i, :-1] - ref).max() <= 1e-4 * scale
        normed = model.adapter.final_norm(torch.from_numpy(acts[i, -1])).detach().numpy()
        assert np.abs(normed - hs[-1][0, -1].numpy()).max() <= 1e-4 * np.abs(normed).max()


def test_greedy_completion_is_cardiac(model):
    prompt = VIGNETTE if model.name == "smollm2-135m" else QA
    enc = model.tokenizer(prompt, return_tensors="pt")
    out = model.hf.generate(**enc, max_new_tokens=12, do_sample=False)
    text = model.tokenizer.decode(out[0, enc.input_ids.shape[1] :]).lower()
    assert any(word in text for word in CARDIAC), text
