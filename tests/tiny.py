"""Tiny random-initialised causal LMs of every supported architecture, with an offline tokenizer.

Built from configs (no weights downloaded); the one fixture module of the test suite
(:func:`make_tiny` for a wrapped model, :func:`make_hf` for the plain transformers one). The tokenizer is a byte-level BPE trained on a few
clinical sentences, so character offsets work as with real fast tokenizers.
"""

from __future__ import annotations

import functools

import torch

# dense architectures; MOE_ARCHS are the mixture-of-experts ones; ALL_ARCHS both
ARCHS = ("llama", "gemma3_text", "qwen2", "qwen3", "mistral", "phi3", "gpt2", "gpt_neox", "olmo2")
MOE_ARCHS = ("gpt_oss", "qwen3_moe")
ALL_ARCHS = ARCHS + MOE_ARCHS
# the architectures the causal-technique tests sweep (a fast, varied subset)
CAUSAL_ARCHS = ("llama", "gemma3_text", "qwen2", "gpt2")
VOCAB = 320

CORPUS = [
    "A 47-year-old woman presents with chest pain radiating to the left arm.",
    "Metformin is a first-line treatment for type 2 diabetes.",
    "The patient was started on atorvastatin, a statin, for high cholesterol.",
    "An 80-year-old man has shortness of breath and swollen ankles.",
    "Stage G3a chronic kidney disease progresses to stage G4 and G5.",
    "The capital of France is Paris. A dog is a mammal.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 47 80 100 mg g mcg units",
]


@functools.cache
def tokenizer():
    """A fast byte-level BPE tokenizer with BOS/EOS/PAD, trained offline on :data:`CORPUS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    return fast


def config(arch: str, n_layers: int = 3):
    """A small config of architecture ``arch`` (hidden 64, 4 heads, vocab 320)."""
    from transformers import AutoConfig

    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        kw = dict(n_embd=64, n_layer=n_layers, n_head=4, n_positions=256, vocab_size=VOCAB)
        return AutoConfig.for_model(arch, **kw, bos_token_id=1, eos_token_id=2)
    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        vocab_size=VOCAB,
        **special,
    )
    if arch != "gpt_neox":
        kw["num_key_value_heads"] = 2
    if arch in ("gemma3_text", "qwen3", "gpt_oss", "qwen3_moe"):
        kw["head_dim"] = 16
    if arch in ("gemma3_text", "gpt_oss"):
        kw["sliding_window"] = 4  # shorter than test prompts so local/global layers differ
    if arch == "gpt_oss":  # 4 experts, 2 per token; plain RoPE (no YaRN warning at this size)
        kw.update(num_local_experts=4, num_experts_per_tok=2)
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    if arch == "qwen3_moe":
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return AutoConfig.for_model(arch, **kw)


def make_hf(arch: str, n_layers: int = 3, seed: int = 0):
    """A random-initialised ``*ForCausalLM`` in eval mode (float32, CPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(arch, n_layers), attn_implementation="eager")
    return model.eval()


def make_tiny(arch: str, n_layers: int = 3, seed: int = 0):
    """A :class:`medmap.MedmapModel` wrapping a tiny random model of ``arch`` (eval, fp32, CPU).

    The name carries the seed (``tiny-llama-s0``) so cell caches never mix two random models.
    """
    from medmap.model.loading import wrap_model

    return wrap_model(make_hf(arch, n_layers, seed), tokenizer(), name=f"tiny-{arch}-s{seed}")
