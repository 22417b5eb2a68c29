"""GPT-OSS MXFP4 checkpoints on CPU: experts dequantised to bf16 on load, gradients work.

The checkpoint is a tiny random GPT-OSS with its expert weights written in the MXFP4 layout
(``*_blocks``: two FP4 values per byte, ``*_scales``: one 8-bit exponent per 32 values). On a
machine without MXFP4 kernels (no GPU / no Triton, as here) transformers dequantises them to
bf16 while loading; the native MXFP4 kernel path cannot be exercised on this CPU machine.
"""

from __future__ import annotations

import json

import numpy as np
import torch

import medmap
from medmap.techniques import saliency_items
from test_saliency_moe import _plain_expert_sums
from tiny import make_hf, tokenizer

E, H, FF, L = 4, 64, 128, 3  # experts, hidden, intermediate, layers of the tiny config


def _mxfp4_checkpoint(d):
    from safetensors.torch import save_file

    hf = make_hf("gpt_oss", seed=1)
    hf.save_pretrained(d)
    tokenizer().save_pretrained(d)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(0)
    for i in range(L):
        for proj, rows, cols in (("gate_up_proj", 2 * FF, H), ("down_proj", H, FF)):
            k = f"model.layers.{i}.mlp.experts.{proj}"
            del sd[k]
            shape = (E, rows, cols // 32)
            sd[k + "_blocks"] = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g)
            sd[k + "_scales"] = torch.randint(122, 126, shape, dtype=torch.uint8, generator=g)
    for f in d.glob("*.safetensors"):
        f.unlink()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"],
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return sd


def test_mxfp4_experts_are_dequantised_to_bf16_and_saliency_runs(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    d = tmp_path / "tiny-gpt-oss-mxfp4"
    d.mkdir()
    sd = _mxfp4_checkpoint(d)
    model = medmap.load_model(d, dtype="bfloat16", attn_implementation="eager")
    ad = model.adapter
    experts = ad.experts(0)
    w = experts.gate_up_proj
    assert w.dtype == torch.bfloat16 and w.shape == (E, H, 2 * FF)
    ref = convert_moe_packed_tensors(
        sd["model.layers.0.mlp.experts.gate_up_proj_blocks"],
        sd["model.layers.0.mlp.experts.gate_up_proj_scales"],
    )
    assert torch.equal(experts.gate_up_proj.data, ref)
    assert ad.fused_experts("model.layers.0.mlp.experts.gate_up_proj") == E
    prompt, target = "Metformin is a first-line treatment for", " type 2 diabetes"
    df = saliency_items(model, [prompt], [target])
    d0 = df.set_index(["layer", "module"])
    for key, (sg, sgw) in _plain_expert_sums(model, prompt, target).items():
        assert sg > 0
        np.testing.assert_allclose(d0.loc[key, "grad_abs_sum"], sg, rtol=1e-6)
        np.testing.assert_allclose(d0.loc[key, "grad_x_weight_sum"], sgw, rtol=1e-6)


def test_dequantize_asks_transformers_to_unpack_mxfp4(tmp_path, monkeypatch):
    """``dequantize=True`` (what a run with saliency asks for) passes ``Mxfp4Config(dequantize=True)``
    for an MXFP4 checkpoint and nothing for a plain one; the weights equal the default load here."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from medmap.model.loading import _quant_method

    d = tmp_path / "tiny-gpt-oss-mxfp4"
    d.mkdir()
    _mxfp4_checkpoint(d)
    plain = tmp_path / "plain"
    make_hf("llama", seed=0).save_pretrained(plain)
    tokenizer().save_pretrained(plain)
    assert _quant_method(d) == "mxfp4" and _quant_method(plain) is None

    seen: list[dict] = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    a = medmap.load_model(d, dtype="bfloat16", dequantize=True)
    medmap.load_model(plain, dequantize=True)
    q = seen[0]["quantization_config"]
    assert isinstance(q, Mxfp4Config) and q.dequantize is True
    assert "quantization_config" not in seen[1]
    b = medmap.load_model(d, dtype="bfloat16")
    assert torch.equal(a.adapter.experts(1).down_proj.data, b.adapter.experts(1).down_proj.data)
