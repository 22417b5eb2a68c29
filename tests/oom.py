"""Simulated out-of-memory for the back-off tests: the base model's forward raises CUDA's OOM."""

from __future__ import annotations

import torch


def oom_above(model, k: int, monkeypatch, *, interrupt_at: int | None = None) -> list[int]:
    """Make ``model``'s base forward raise ``torch.OutOfMemoryError`` for batches larger than ``k``.

    Returns the list of batch sizes it was called with (appended as calls happen). With
    ``interrupt_at`` the call of that number (1-based) raises ``KeyboardInterrupt`` instead of
    running, as if the user pressed Ctrl-C then.
    """
    base = model.hf.model
    real = base.forward
    calls: list[int] = []

    def forward(*args, **kwargs):
        b = kwargs["input_ids"].shape[0]
        calls.append(b)
        if b > k:
            raise torch.OutOfMemoryError(f"CUDA out of memory (batch {b})")
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(base, "forward", forward)
    return calls
