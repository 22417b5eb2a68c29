"""Capture the residual stream of every (or chosen) layer at chosen token positions.

Only the requested positions are kept: each block's output ``(batch, seq, d_model)`` is reduced
inside its hook to ``(batch, d_model)`` before the next block runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from medmap.batching import run_with_backoff
from medmap.errors import MedmapError
from medmap.model.sites import TraceBlocks, check_layers
from medmap.model.tokens import Position, encode, position_weights
from medmap.progress import progress_bar


def iter_batches(n: int, batch_size: int) -> Iterable[slice]:
    """Slices ``[0:b], [b:2b], ...`` covering ``range(n)``."""
    if batch_size < 1:
        raise MedmapError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def _positions_for(position: Position, idx: Sequence[int]):
    """The position request for the prompts ``idx`` (a shared request, or one span per prompt)."""
    if isinstance(position, str):
        return position
    if (
        isinstance(position, tuple)
        and len(position) == 2
        and all(isinstance(v, int) for v in position)
    ):
        return position
    spans = list(position)
    return [spans[i] for i in idx]


def capture(
    model,
    prompts: Sequence[str],
    *,
    layers: Iterable[int] | None = None,
    position: Position = "last",
    batch_size: int = 16,
    padding_side: str = "right",
    progress: bool = False,
    out: str | os.PathLike | None = None,
    check_finite: bool = True,
    bucket: bool = True,
) -> np.ndarray:
    """Residual-stream activations of ``prompts``.

    Args:
        model: a :class:`medmap.MedmapModel`.
        prompts: the prompt strings (tokenised with the tokenizer's special tokens).
        layers: residual indices to keep, each in ``0..n_layers`` (0 = embedding output as
            block 0 sees it; ``l`` = after block ``l``, before the final norm). ``None`` = all.
        position: ``"last"`` (last real token), ``"mean"`` (all real tokens), one character span
            ``(start, end)`` for all prompts, or one span per prompt; span tokens are averaged.
        batch_size: prompts per forward pass. Padding never changes the values. Out of
            memory halves it and retries the same prompts (:mod:`medmap.batching`).
        padding_side: ``"right"`` (default) or ``"left"``; position ids are set from the mask.
        out: if given, stream the activations into an on-disk store at this directory (see
            :mod:`medmap.techniques.capture.store`) and return the read-only memmap.
        check_finite: raise if any captured value is NaN/inf (e.g. fp16 overflow), naming the layer.
        bucket: batch prompts of similar token length together (less padding; the output keeps
            the input order and the values do not depend on it).

    Returns:
        float32 array ``(n_prompts, len(layers), d_model)``; with ``layers=None`` that is
        ``(n_prompts, n_layers + 1, d_model)``.
    """
    from medmap.techniques.capture.store import ActivationStore

    if len(prompts) == 0:
        raise MedmapError("no prompts given", hint="pass at least one prompt")
    layer_list = check_layers(layers, model.n_layers)
    col = {layer: j for j, layer in enumerate(layer_list)}
    shape = (len(prompts), len(layer_list), model.d_model)
    # Validate every prompt before any work is done (no partial output on bad input).
    lengths: list[int] = []
    for sl in iter_batches(len(prompts), max(batch_size, 1)):
        lengths += encode(model.tokenizer, prompts[sl], max_length=model.max_length).lengths
    # padding-aware bucketing: batches of similar length (stable, so equal lengths keep order)
    order = np.argsort(lengths, kind="stable") if bucket else np.arange(len(prompts))

    store = None
    if out is not None:
        meta = {"model": model.name, "layers": layer_list, "position": str(position)[:200]}
        store = ActivationStore(out, shape, meta, prompts=list(prompts))
        result = store.array
    else:
        result = np.empty(shape, dtype=np.float32)
    device = model.input_device
    try:
        with progress_bar("capture", total=len(prompts), enabled=progress) as advance:

            def run_batch(sl: slice) -> None:
                idx = order[sl]
                batch = encode(
                    model.tokenizer, [prompts[i] for i in idx], padding_side=padding_side
                )
                w = position_weights(batch, _positions_for(position, idx))
                buf: dict[int, torch.Tensor] = {}

                def reduce(layer: int, h: torch.Tensor, _w=w, _buf=buf) -> None:
                    _buf[layer] = torch.einsum(
                        "bs,bsd->bd", _w.to(h.device, torch.float32), h.float()
                    )

                with torch.inference_mode():
                    _forward_blocks_only(model, batch.model_inputs(device), layer_list, reduce)
                for layer, v in buf.items():  # in forward order: the first bad layer is named
                    arr = v.cpu().numpy()
                    if check_finite and not np.isfinite(arr).all():
                        bad = sorted(int(i) for i in idx[~np.isfinite(arr).all(-1)])
                        raise MedmapError(
                            f"non-finite activations (NaN/inf) at layer {layer} for prompts {bad[:5]}",
                            hint="fp16 overflow is the usual cause: load the model with dtype=bfloat16 or float32",
                        )
                    result[idx, col[layer]] = arr
                advance(sl.stop - sl.start)

            # out of memory: the same prompts again in smaller batches (identical values)
            run_with_backoff(run_batch, len(prompts), batch_size, what="prompt")
        if store is not None:
            store.__exit__(None, None, None)
            from medmap.techniques.capture.store import open_store

            result, _ = open_store(out)
    except BaseException as e:
        if store is not None:
            store.__exit__(type(e), e, None)
        raise
    return result


def _forward_blocks_only(model, inputs: dict, layers: list[int], reduce) -> None:
    """Run the base model (no LM head) reading residual ``layers``; stop after the last of them.

    Skipping the unembedding saves the (vocab × d_model) matmul, large for 262k-token vocabularies.
    """
    last = max(layers)
    with TraceBlocks(
        model.adapter, layers, reduce=reduce, stop_after=last if last < model.n_layers else None
    ):
        model.adapter.base(**inputs, use_cache=False)
