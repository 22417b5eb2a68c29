"""Batches that shrink when memory runs out.

:func:`run_with_backoff` walks ``range(n)`` in consecutive slices of ``batch_size``; when a slice
runs out of memory (``torch.OutOfMemoryError`` on CUDA/MPS, or the CPU allocator's
``RuntimeError``) the same slice is retried with half the batch size, and the smaller size is kept
for the rest. Slices are always processed in order and each exactly once to completion, so the
result equals a run started with the final batch size. Out of memory with a batch of 1 becomes a
one-line :class:`~medmap.errors.MedmapError`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch

from medmap.errors import MedmapError

log = logging.getLogger("medmap")

_OOM_TEXT = (
    "out of memory",  # CUDA ("CUDA out of memory"), MPS ("MPS backend out of memory")
    "can't allocate memory",  # CPU: "DefaultCPUAllocator: can't allocate memory"
    "cannot allocate memory",
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of PyTorch (any device) or Python."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


def free_memory() -> None:
    """Collect garbage and return cached accelerator memory (after an out-of-memory error)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_backoff(
    process: Callable[[slice], None],
    n: int,
    batch_size: int,
    *,
    what: str = "batch",
    on_shrink: Callable[[int, int], None] | None = None,
) -> int:
    """Call ``process(slice)`` for consecutive slices covering ``range(n)``; return the final size.

    Args:
        process: does the work of one slice; must leave no state behind when it raises (it is
            called again for the same rows with a smaller slice).
        n: number of rows.
        batch_size: rows per slice to start with (>= 1).
        what: word for the rows in messages (``"prompt"``, ``"item"`` ...).
        on_shrink: called as ``on_shrink(old_size, new_size)`` before a retry (default: a
            warning on the ``medmap`` logger).

    Raises:
        MedmapError: out of memory even with one row per slice.
    """
    if batch_size < 1:
        raise MedmapError(f"batch size must be >= 1, got {batch_size}")
    size = batch_size
    start = 0
    while start < n:
        sl = slice(start, min(n, start + size))
        try:
            process(sl)
        except Exception as e:
            if not is_oom(e):
                raise
        else:
            start = sl.stop
            continue
        # Out of the except block, so the failed batch's traceback (and its tensors) is gone.
        free_memory()
        if sl.stop - sl.start == 1:
            raise MedmapError(
                f"out of memory with a batch of 1 {what} ({what} {start})",
                hint="load the model in bfloat16 (--dtype bfloat16), shard it over devices "
                "(device_map), or use a machine with more memory",
            )
        new = max(1, (sl.stop - sl.start) // 2)
        (on_shrink or _warn)(size, new)
        size = new
    return size


def _warn(old: int, new: int) -> None:
    log.warning("out of memory with batch size %d; retrying with %d", old, new)
