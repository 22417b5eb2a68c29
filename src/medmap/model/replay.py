"""Record one forward pass block by block, then replay any suffix of blocks from an edited state.

Lesioning and patching change the residual stream at one depth and need the rest of the forward
pass from there. Recomputing the unchanged prefix each time is wasted work: :func:`record`
runs the model once and keeps, for every block, its input hidden state and the exact
``(args, kwargs)`` the model called it with (attention masks, rotary position embeddings,
position ids ... whatever the architecture passes, e.g. Gemma3's per-layer-type masks), and
:func:`run_blocks` calls blocks ``start..`` directly with those recorded arguments. No
architecture-specific code: only the HF model's own modules run. Recording is one
:class:`~medmap.model.sites.Trace` (the same hooks every technique uses); interventions during a
replay are a ``Trace`` around :func:`run_blocks` (e.g. ``ablate=["mlp_out.3"]``), since the
blocks' own sub-modules run.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from medmap.errors import MedmapError
from medmap.model.adapter import BATCH_MAJOR
from medmap.model.sites import Site, Trace, block_input, block_output, with_block_input


@dataclass
class Recording:
    """A forward pass seen block by block.

    Attributes:
        inputs: ``inputs[l]`` is block ``l``'s input hidden state ``(batch, seq, d_model)``
            (residual index ``l``); ``inputs[n_layers]`` is the last block's output.
        calls: ``calls[l] = (args, kwargs)`` the model passed block ``l``.
        batch_size: rows of the recorded batch.
        sites: values of the extra sites asked for (``record(..., sites=...)``), e.g.
            ``sites[Site("attn_out", 3)]`` ``(batch, seq, d_model)``.
    """

    inputs: list[torch.Tensor]
    calls: list[tuple[tuple, dict]]
    batch_size: int
    sites: dict[Site, torch.Tensor] = field(default_factory=dict)

    def resid(self, layer: int) -> torch.Tensor:
        """Residual stream at residual index ``layer`` (0..n_layers)."""
        return self.inputs[layer]


def record(
    model,
    inputs: dict[str, torch.Tensor],
    *,
    upto: int | None = None,
    check_finite: bool = True,
    sites: Sequence[Site | str] = (),
) -> Recording:
    """Run the base model (no LM head) once and record every block's input and call arguments.

    ``upto``: stop after recording block ``upto``'s input (saves the rest of the pass; then
    ``inputs`` has ``upto + 1`` entries). ``sites``: extra sites to keep whole (e.g.
    ``attn_out.3``, for patching a sub-module's output). Runs without gradients.
    ``check_finite``: raise a :class:`~medmap.errors.MedmapError` naming the first residual layer
    whose real (unpadded) tokens hold NaN/inf, e.g. after a float16 overflow.
    """
    adapter = model.adapter
    n = adapter.n_layers
    last = n if upto is None else upto
    extra = [Site.parse(x) for x in sites]
    resid = [Site("resid_pre", i) for i in range(min(last + 1, n))]
    if last == n:
        resid.append(Site("resid_post", n - 1))
    stop = Site("resid_pre", last) if last < n else None
    if stop is not None and any(x.resid_index > last for x in extra):
        raise MedmapError(f"record(upto={last}) cannot keep sites after residual index {last}")
    tr = Trace(
        adapter,
        resid + extra,
        reduce=lambda _s, h: h.detach(),
        stop_after=stop,
        calls=True,
    )
    with torch.no_grad(), tr:
        adapter.base(**inputs, use_cache=False)
    inputs_ = [tr.values[x] for x in resid]
    calls = [tr.calls[i] for i in range(min(last + 1, n))]
    batch = inputs["input_ids"].shape[0]
    if check_finite:
        check_finite_layers(inputs_, inputs.get("attention_mask"))
    return Recording(
        inputs=inputs_, calls=calls, batch_size=batch, sites={x: tr.values[x] for x in extra}
    )


def check_finite_layers(
    hidden: Sequence[torch.Tensor | None], attention_mask: torch.Tensor | None = None
) -> None:
    """Raise :class:`MedmapError` naming the first residual layer with NaN/inf at a real token."""
    for layer, h in enumerate(hidden):
        if h is None:
            continue
        real = h if attention_mask is None else h[attention_mask.to(h.device).bool()]
        if not bool(torch.isfinite(real).all()):
            raise MedmapError(
                f"non-finite activations (NaN/inf) at layer {layer}",
                hint="fp16 overflow is the usual cause: load the model with dtype=bfloat16 or float32",
            )


def _param_names(block) -> list[str]:
    params = list(inspect.signature(block.forward).parameters.values())
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _repeat_value(name: str, value: Any, batch: int, times: int, batch_major=BATCH_MAJOR) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == batch:
            if name not in batch_major:
                raise _Unstackable(name)
            return value.repeat(times, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, tuple | list):
        return type(value)(_repeat_value(name, v, batch, times, batch_major) for v in value)
    if isinstance(value, dict):
        return {k: _repeat_value(name, v, batch, times, batch_major) for k, v in value.items()}
    return value


class _Unstackable(Exception):
    pass


def repeat_call(
    block, args: tuple, kwargs: dict, batch: int, times: int, batch_major=BATCH_MAJOR
) -> tuple[tuple, dict]:
    """Block call arguments for a batch stacked ``times`` along dim 0 (hidden state excluded).

    Positional arguments are named through the block's signature; tensors whose first dimension
    equals ``batch`` are repeated only under a known batch-major name (``batch_major``, the
    adapter's :attr:`~medmap.model.adapter.LayerAdapter.batch_major`).
    Raises ``ValueError`` if some other argument is batch-major (stacking would be unsafe).
    """
    if times == 1:
        return args, kwargs
    names = _param_names(block)
    try:
        new_args = [args[0]] + [
            _repeat_value(names[i] if i < len(names) else "", a, batch, times, batch_major)
            for i, a in enumerate(args[1:], start=1)
        ]
        new_kwargs = {
            k: (v if k == "hidden_states" else _repeat_value(k, v, batch, times, batch_major))
            for k, v in kwargs.items()
        }
    except _Unstackable as e:
        raise ValueError(f"argument {e.args[0]!r} looks batch-major; cannot stack") from None
    return tuple(new_args), new_kwargs


def can_stack(model, rec: Recording, times: int = 2) -> bool:
    """Whether every recorded block call can be repeated along the batch (see :func:`repeat_call`)."""
    try:
        for block, (args, kwargs) in zip(model.adapter.blocks, rec.calls):
            repeat_call(block, args, kwargs, rec.batch_size, times, model.adapter.batch_major)
    except ValueError:
        return False
    return True


def stacked_calls(model, rec: Recording, times: int) -> list[tuple[tuple, dict]]:
    """Every recorded block call repeated ``times`` along the batch (see :func:`repeat_call`)."""
    return [
        repeat_call(block, args, kwargs, rec.batch_size, times, model.adapter.batch_major)
        for block, (args, kwargs) in zip(model.adapter.blocks, rec.calls)
    ]


def run_blocks(
    model,
    rec: Recording,
    hidden: torch.Tensor,
    start: int,
    *,
    times: int = 1,
    calls: Sequence[tuple[tuple, dict]] | None = None,
) -> torch.Tensor:
    """Run blocks ``start..n_layers-1`` on ``hidden`` with the recorded call arguments.

    ``hidden``: ``(batch * times, seq, d_model)``, the residual stream at index ``start`` (block
    ``start``'s input); ``times`` > 1 means ``times`` copies of the recorded batch are stacked
    along dim 0. ``calls`` overrides the recorded arguments (e.g. from :func:`stacked_calls`,
    computed once and reused). Returns the last block's output (residual index ``n_layers``),
    before the final norm.
    """
    blocks = model.adapter.blocks
    if calls is None:
        calls = rec.calls if times == 1 else stacked_calls(model, rec, times)
    h = hidden
    with torch.no_grad():
        for j in range(start, len(blocks)):
            args, kwargs = calls[j]
            a, k = with_block_input(args, kwargs, h.to(block_input(args, kwargs).device))
            h = block_output(blocks[j](*a, **k))
    return h
