"""Layer adapter and scoped hooks on tiny random models of every supported architecture."""

from __future__ import annotations

import copy

import pytest
import torch

from medmap.errors import MedmapError
from medmap.model.sites import SkipBlocks, TraceBlocks, count_hooks
from tiny import ARCHS, make_tiny

PROMPT = "A 47-year-old woman presents with chest pain radiating to the left arm."


def _inputs(m, text=PROMPT):
    return m.tokenizer(text, return_tensors="pt")


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_finds_all_parts(arch):
    m = make_tiny(arch, n_layers=3)
    a = m.adapter
    assert a.n_layers == 3 and len(a.blocks) == 3
    assert a.embed is m.hf.get_input_embeddings()
    assert a.unembed is m.hf.get_output_embeddings()
    assert a.final_norm is not None and "norm" in type(a.final_norm).__name__.lower()
    assert a.d_model == 64
    # head(resid after last block) reproduces the model's logits exactly.
    with torch.no_grad(), TraceBlocks(a, [3]) as tr:
        logits = m.hf(**_inputs(m)).logits
    assert torch.equal(a.head(tr.values[3]), logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_idle_hooks_leave_logits_unchanged(arch):
    m = make_tiny(arch)
    with torch.no_grad():
        plain = m.hf(**_inputs(m)).logits
        with TraceBlocks(m.adapter, None, reduce=lambda _l, h: None):
            hooked = m.hf(**_inputs(m)).logits
    assert torch.equal(plain, hooked)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_hooks_removed_after_exception(arch):
    m = make_tiny(arch)
    before = count_hooks(m.hf)

    def boom(_l, _h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), TraceBlocks(m.adapter, [0, 2], reduce=boom):
        m.hf(**_inputs(m))
    assert count_hooks(m.hf) == before
    with pytest.raises(ValueError), SkipBlocks(m.adapter, [1]):
        assert count_hooks(m.hf) == before + 1
        raise ValueError
    assert count_hooks(m.hf) == before


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "qwen2"])
def test_edit_replaces_block_output(arch):
    m = make_tiny(arch)
    inp = _inputs(m)
    with torch.no_grad(), TraceBlocks(m.adapter, [2]) as tr:
        m.hf(**inp)
    zero_last = lambda _l, h: torch.cat([h[:, :-1], torch.zeros_like(h[:, -1:])], dim=1)  # noqa: E731
    with torch.no_grad(), TraceBlocks(m.adapter, [2], edit=zero_last) as tr2:
        edited = m.hf(**inp).logits
    assert torch.all(tr2.values[2][:, -1] == 0)
    assert torch.equal(tr2.values[2][:, :-1], tr.values[2][:, :-1])
    with torch.no_grad():
        plain = m.hf(**inp).logits
    # Earlier positions cannot see the edit (causal), the last one must change.
    assert torch.allclose(edited[:, :-1], plain[:, :-1], atol=1e-6)
    assert not torch.allclose(edited[:, -1], plain[:, -1])


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "gpt_neox"])
def test_skip_block_equals_deleting_it(arch):
    m = make_tiny(arch, n_layers=4)
    inp = _inputs(m)
    with torch.no_grad(), SkipBlocks(m.adapter, [1]):
        skipped = m.hf(**inp).logits
    deleted = copy.deepcopy(m.hf)
    blocks = deleted.get_submodule(m.adapter.blocks_path)
    del blocks[1]
    cfg = deleted.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:1] + cfg.layer_types[2:]
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, 3)
    with torch.no_grad():
        ref = deleted(**inp, use_cache=False).logits
    assert torch.allclose(skipped, ref, atol=1e-5)
    with torch.no_grad():
        plain = m.hf(**inp).logits
    assert not torch.allclose(skipped, plain, atol=1e-3)


def test_layer_out_of_range_is_a_user_error():
    m = make_tiny("llama")
    with pytest.raises(MedmapError, match="layer index 9 is out of range"):
        TraceBlocks(m.adapter, [9])
    with pytest.raises(MedmapError, match="block index 3 is out of range"):
        SkipBlocks(m.adapter, [3])
