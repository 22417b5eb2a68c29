"""capture(): exact residual stream vs plain transformers, padding invariance, spans, stores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medmap
from medmap.errors import MedmapError
from medmap.model.sites import count_hooks
from medmap.techniques.capture.store import open_store
from tiny import ARCHS, make_tiny

PROMPTS = [
    "A 47-year-old woman presents with chest pain radiating to the left arm.",
    "Metformin is a first-line treatment for",
    "Hi",
    "An 80-year-old man has shortness of breath and swollen ankles.",
]


def _hf_hidden(m, text):
    enc = m.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return [h[0] for h in m.hf(**enc, output_hidden_states=True).hidden_states]


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_equals_hf_hidden_states(arch):
    m = make_tiny(arch)
    acts = medmap.capture(m, PROMPTS, batch_size=2)
    assert acts.shape == (len(PROMPTS), m.n_layers + 1, m.d_model) and acts.dtype == np.float32
    for i, p in enumerate(PROMPTS):
        hs = _hf_hidden(m, p)
        # HF entries 0..L-1 are the residual stream; entry L is taken after the final norm.
        ref = torch.stack([h[-1] for h in hs[:-1]]).numpy()
        np.testing.assert_allclose(acts[i, :-1], ref, atol=1e-5, rtol=0)
        normed = m.adapter.final_norm(torch.from_numpy(acts[i, -1]))
        np.testing.assert_allclose(normed.detach().numpy(), hs[-1][-1].numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_single(arch, side):
    m = make_tiny(arch)
    for position in ("last", "mean"):
        batched = medmap.capture(m, PROMPTS, batch_size=4, padding_side=side, position=position)
        single = np.concatenate([medmap.capture(m, [p], position=position) for p in PROMPTS])
        np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)


def test_mean_and_span_positions_match_manual_average():
    m = make_tiny("llama")
    text = PROMPTS[0]
    start = text.index("chest pain")
    span = (start, start + len("chest pain"))
    hs = _hf_hidden(m, text)
    enc = m.tokenizer(text, return_offsets_mapping=True)
    toks = [
        t for t, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < span[1] and b > span[0]
    ]
    assert len(toks) >= 2  # the span covers several tokens, so averaging is exercised
    got = medmap.capture(m, [text], position=[span], layers=[0, 2])
    for j, layer in enumerate([0, 2]):
        np.testing.assert_allclose(got[0, j], hs[layer][toks].mean(0).numpy(), atol=1e-6)
    mean = medmap.capture(m, [text], position="mean", layers=[1])
    np.testing.assert_allclose(mean[0, 0], hs[1].mean(0).numpy(), atol=1e-6)


def test_spans_survive_padding():
    m = make_tiny("qwen2")
    spans = []
    for p in PROMPTS:
        w = p.split()[0]
        spans.append((p.index(w), p.index(w) + len(w)))
    a = medmap.capture(m, PROMPTS, position=spans, batch_size=4, padding_side="left")
    b = np.concatenate([medmap.capture(m, [p], position=[s]) for p, s in zip(PROMPTS, spans)])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bucketing_keeps_input_order_and_values(monkeypatch):
    import medmap.techniques.capture as act

    m = make_tiny("llama")
    prompts = PROMPTS * 3  # lengths interleave long, short, tiny
    spans = [(0, len(p.split()[0])) for p in prompts]
    seen: list[list[int]] = []
    real_encode = act.encode

    def spy(tok, texts, **kw):
        out = real_encode(tok, texts, **kw)
        if "padding_side" in kw:  # the batches of the forward passes
            seen.append(list(out.lengths))
        return out

    monkeypatch.setattr(act, "encode", spy)
    a = medmap.capture(m, prompts, position=spans, batch_size=3, bucket=True)
    bucketed = [sorted(x) for x in seen]
    seen.clear()
    b = medmap.capture(m, prompts, position=spans, batch_size=3, bucket=False)
    plain = seen
    np.testing.assert_allclose(a, b, atol=1e-5)  # same values, input order
    lengths = [n for batch in bucketed for n in batch]
    assert lengths == sorted(lengths)  # batches of similar length
    padded = lambda batches: sum(max(x) * len(x) - sum(x) for x in batches)
    assert padded(bucketed) < padded(plain)


def test_layer_subset_and_no_hook_leak():
    m = make_tiny("gemma3_text")
    before = count_hooks(m.hf)
    full = medmap.capture(m, PROMPTS)
    sub = medmap.capture(m, PROMPTS, layers=[3, 1])
    np.testing.assert_array_equal(sub[:, 0], full[:, 3])
    np.testing.assert_array_equal(sub[:, 1], full[:, 1])
    assert count_hooks(m.hf) == before


def test_store_streams_to_disk(tmp_path):
    m = make_tiny("llama")
    out = tmp_path / "store"
    arr = medmap.capture(m, PROMPTS, out=out, batch_size=3)
    ref = medmap.capture(m, PROMPTS)
    loaded, manifest = open_store(out)
    np.testing.assert_array_equal(np.asarray(loaded), ref)
    np.testing.assert_array_equal(np.asarray(arr), ref)
    assert manifest["complete"] and manifest["shape"] == list(ref.shape)
    assert json.loads((out / "prompts.json").read_text()) == PROMPTS
    with pytest.raises(MedmapError, match="already holds an activation store"):
        medmap.capture(m, PROMPTS, out=out)


def test_failed_capture_leaves_no_store(tmp_path):
    m = make_tiny("llama")
    out = tmp_path / "store"
    with pytest.raises(MedmapError, match="covers no token"):
        medmap.capture(m, PROMPTS[:2], out=out, position=[(0, 1), (500, 600)], batch_size=1)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_nonfinite_activation_names_the_layer():
    m = make_tiny("llama")
    with torch.no_grad():
        m.adapter.blocks[1].mlp.down_proj.weight.fill_(float("inf"))
    with pytest.raises(MedmapError, match="non-finite activations .* at layer 2"):
        medmap.capture(m, PROMPTS[:1])


def test_bad_prompts():
    m = make_tiny("llama")
    with pytest.raises(MedmapError, match="no prompts given"):
        medmap.capture(m, [])
    with pytest.raises(MedmapError, match="prompt 1 is empty"):
        medmap.capture(m, ["ok", "  "])
    with pytest.raises(MedmapError, match="longer than the model context of 256"):
        medmap.capture(m, ["word " * 400])
    with pytest.raises(MedmapError, match="unknown position"):
        medmap.capture(m, ["ok"], position="first")
