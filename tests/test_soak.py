"""Soak: 1,000 capture batches on a tiny model keep memory flat and leave no hooks behind."""

from __future__ import annotations

import gc

import psutil

import medmap
from medmap.model.sites import count_hooks
from tiny import make_tiny

PROMPTS = [
    "A 47-year-old woman presents with chest pain radiating to the left arm.",
    "Metformin is a first-line treatment for type 2 diabetes.",
]


def test_thousand_batches_flat_memory():
    m = make_tiny("llama")
    hooks_before = count_hooks(m.hf)
    proc = psutil.Process()
    rss = []
    for i in range(1000):
        medmap.capture(m, PROMPTS, batch_size=2, position="mean" if i % 2 else "last")
        if i in (199, 999):
            gc.collect()
            rss.append(proc.memory_info().rss)
    assert count_hooks(m.hf) == hooks_before
    growth_mb = (rss[1] - rss[0]) / 2**20
    # 800 batches after warm-up: a leak of one activation tensor per batch would add
    # far more than this (each batch allocates ~16 intermediate tensors).
    assert growth_mb < 8, f"RSS grew by {growth_mb:.1f} MiB over 800 batches"
