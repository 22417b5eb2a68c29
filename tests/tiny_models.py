"""Tiny random causal LMs for causal-technique tests (built from configs, offline tokenizer).

Thin layer over :mod:`tiny` (the foundation's builder): hidden size 64, 4 heads, vocab 320,
3 blocks by default, byte-level BPE tokenizer trained offline on a few clinical sentences.
"""

from __future__ import annotations

from tiny import ARCHS, make_hf, tokenizer

CAUSAL_ARCHS = ("llama", "gemma3_text", "qwen2", "gpt2")

__all__ = ["ARCHS", "CAUSAL_ARCHS", "make_hf", "make_tiny", "tokenizer"]


def make_tiny(arch: str, seed: int = 0, n_layers: int = 3):
    """A :class:`medmap.MedmapModel` around a random ``arch`` model (eval mode, float32, CPU)."""
    from medmap.loading import wrap_model

    return wrap_model(make_hf(arch, n_layers, seed), tokenizer(), name=f"tiny-{arch}-s{seed}")
