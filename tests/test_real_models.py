"""The two bundled real models: GGUF → cached safetensors, exact capture, sensible completions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medmap
from medmap.model.loading import convert_gguf, gguf_cache_dir
from medmap.model.registry import BUNDLED_MODELS

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


EDGE_TEXTS = [
    "",
    " ",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines",
    "Metformin 500\u202fmg b.i.d.; HbA1c 7.2%; eGFR < 30 mL/min/1.73 m²",
    "ünïcödé — ‘quotes’ “double” 漢字 ‍👩‍⚕️",
    "<bos><eos><pad> special strings inside text <|im_start|><|im_end|>",
]


def _bundled_texts() -> list[str]:
    from medmap.concepts.loader import list_concepts, load_concepts

    texts = list(EDGE_TEXTS)
    for name in list_concepts():
        cs = load_concepts(name)
        texts += [p.text for p in cs.render()]
        for t in cs.targets():
            texts += [t.prompt, *(t.prompt + " " + a for a in t.answers), *t.answers]
    return texts


def test_cached_tokenizer_equals_the_gguf_tokenizer(model):
    """medmap reads the cached tokenizer.json with one parse (loading._cached_gguf_tokenizer);
    it must be the tokenizer transformers builds from the GGUF file itself."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    gguf = BUNDLED_MODELS[model.name].gguf_path()
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = model.tokenizer
    assert type(tok) is TokenizersBackend  # the one-parse path, whatever class the GGUF names
    texts = _bundled_texts()
    assert len(texts) > 9000
    for text in texts:
        for special in (True, False):
            a = ref(text, return_offsets_mapping=True, add_special_tokens=special)
            b = tok(text, return_offsets_mapping=True, add_special_tokens=special)
            assert a["input_ids"] == b["input_ids"], text
            assert a["offset_mapping"] == b["offset_mapping"], text
        ids = a["input_ids"]
        assert ref.decode(ids) == tok.decode(ids), text
    assert tok.get_vocab() == ref.get_vocab()
    assert len(tok) == len(ref)
    assert {i: str(t) for i, t in tok.added_tokens_decoder.items()} == {
        i: str(t) for i, t in ref.added_tokens_decoder.items()
    }
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id", "padding_side", "truncation_side"):
        assert getattr(tok, attr) == getattr(ref, attr), attr
    assert tok.all_special_ids == ref.all_special_ids
    assert tok.pad_token_id == (
        ref.pad_token_id if ref.pad_token_id is not None else ref.eos_token_id
    )
    assert tok.chat_template == ref.chat_template
    if ref.chat_template is not None:
        chat = [{"role": "user", "content": "What is the first-line drug for type 2 diabetes?"}]
        kw = {"tokenize": False, "add_generation_prompt": True}
        assert tok.apply_chat_template(chat, **kw) == ref.apply_chat_template(chat, **kw)
