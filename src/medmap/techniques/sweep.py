"""The chunk × layer cell loop shared by the lesion and patching sweeps, with OOM back-off.

Items are split into chunks of ``batch_size``; a *cell* is one (chunk, layer) and is stored by
:class:`~medmap.run.cells.CellCache` under a key of the chunk's contents, so a resumed run
skips finished cells. A chunk's missing layers are computed together (one recorded intact pass
serves them all), and each cell is stored as soon as it is done.

Out of memory: the same chunk is recomputed in micro-batches of half the size (and so on, down
to one item, see :func:`medmap.batching.run_with_backoff`), and the smaller size is kept for the
following chunks. The cells keep their keys: a cell computed in micro-batches is the
concatenation of its micro-batches' rows, stored once all of them are done, so batch-size
back-off never changes which cells exist and a resumed run still finds them. A technique whose
items are already one per pass (saliency: one backward pass per item, so a smaller batch frees
nothing) turns the back-off off with ``backoff=False``; its cells have a single pseudo-layer.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from medmap.batching import run_with_backoff
from medmap.progress import progress_bar
from medmap.run.cells import CellCache
from medmap.techniques.capture import iter_batches

Emit = Callable[[int, pd.DataFrame], None]
Compute = Callable[[slice, list[int], Emit], None]


def sweep_cells(
    n_items: int,
    batch_size: int,
    layers: list[int],
    key_of: Callable[[slice, int], str],
    compute: Compute,
    cache: CellCache,
    *,
    description: str = "sweep",
    progress: bool = False,
    what: str = "item",
    backoff: bool = True,
    count: str = "cells",
) -> list[pd.DataFrame]:
    """Run every (chunk, layer) cell not yet in ``cache``; return all cells' frames.

    Args:
        n_items: number of items (prompts or pairs).
        batch_size: items per chunk (the unit of resumption) and first micro-batch size.
        layers: the layers to compute for every chunk.
        key_of: ``key_of(chunk, layer)`` = the cell key (a chunk is a ``slice`` of the items).
        compute: ``compute(items, layers, emit)`` computes rows for the items in the slice
            ``items`` (absolute indices) at each of ``layers`` and calls ``emit(layer, frame)``
            once per layer as soon as that layer is done. It must leave no state behind when it
            raises (it is called again for the same items with a smaller slice).
        cache: finished cells.
        description / progress: label of the progress bar (see ``count``) and whether to
            show it.
        what: word for the items in the out-of-memory message.
        backoff: retry a chunk that runs out of memory in halved micro-batches (see the module
            docstring). ``False``: ``compute`` is called once per chunk with all its items and
            any error (out of memory included) propagates unchanged.
        count: what the progress bar counts: ``"cells"`` (one step per cell) or ``"items"``
            (``n_items * len(layers)`` steps; a cell advances it by its number of items).

    Returns:
        The frames in chunk-major, then ``layers`` order.
    """
    if count not in ("cells", "items"):
        raise ValueError(f"count must be 'cells' or 'items', not {count!r}")
    size = batch_size
    frames: list[pd.DataFrame] = []
    chunks = list(iter_batches(n_items, batch_size))
    total = (n_items if count == "items" else len(chunks)) * len(layers)
    with progress_bar(description, total=total, enabled=progress) as bar:
        for chunk in chunks:
            step = chunk.stop - chunk.start if count == "items" else 1

            def advance(cells: int, step: int = step) -> None:
                bar(cells * step)

            keys = {layer: key_of(chunk, layer) for layer in layers}
            done = {layer: cache.get(key) for layer, key in keys.items()}
            missing = [layer for layer, df in done.items() if df is None]
            advance(len(layers) - len(missing))
            if missing:
                size = _compute_chunk(
                    chunk, missing, keys, done, compute, cache, advance, size, what,
                    backoff=backoff,
                )  # fmt: skip
            frames.extend(done[layer] for layer in layers)
    return frames


def _compute_chunk(
    chunk, missing, keys, done, compute, cache, advance, size, what, *, backoff=True
) -> int:
    n = chunk.stop - chunk.start
    parts: dict[int, list[pd.DataFrame]] = {}

    def process(sub: slice) -> None:
        items = slice(chunk.start + sub.start, chunk.start + sub.stop)
        todo = [layer for layer in missing if done[layer] is None]
        if sub.stop - sub.start == n:  # the whole chunk at once: store each cell when done

            def emit(layer: int, df: pd.DataFrame) -> None:
                done[layer] = cache.put(keys[layer], df)
                advance(1)

            compute(items, todo, emit)
            return
        local: dict[int, pd.DataFrame] = {}
        compute(items, todo, local.__setitem__)
        for layer, df in local.items():  # only a finished micro-batch counts
            parts.setdefault(layer, []).append(df)

    if not backoff:  # the whole chunk at once, errors unchanged
        process(slice(0, n))
        return size
    size = run_with_backoff(process, n, min(size, n), what=what)
    for layer in missing:
        if done[layer] is None:
            df = pd.concat(parts[layer], ignore_index=True)
            done[layer] = cache.put(keys[layer], df)
            advance(1)
    return size
