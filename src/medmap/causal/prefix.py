"""Record one forward pass block by block, then replay any suffix of blocks from an edited state.

Lesioning and patching change the residual stream at one depth and need the rest of the forward
pass from there. Recomputing the unchanged prefix each time is wasted work: :func:`record`
runs the model once and keeps, for every block, its input hidden state and the exact
``(args, kwargs)`` the model called it with (attention masks, rotary position embeddings,
position ids ... whatever the architecture passes, e.g. Gemma3's per-layer-type masks), and
:func:`run_blocks` calls blocks ``start..`` directly with those recorded arguments. No
architecture-specific code: only the HF model's own modules run.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medmap.errors import MedmapError
from medmap.hooks import block_input, block_output, with_block_input

# Keyword names that are known to be batch-major when their first dimension equals the batch
# size; only these are repeated when several interventions are stacked along the batch.
BATCH_MAJOR = frozenset(
    {
        "attention_mask",
        "causal_mask",
        "position_embeddings",
        "position_ids",
        "encoder_attention_mask",
    }
)


class _Stop(Exception):
    pass


@dataclass
class Recording:
    """A forward pass seen block by block.

    Attributes:
        inputs: ``inputs[l]`` is block ``l``'s input hidden state ``(batch, seq, d_model)``
            (residual index ``l``); ``inputs[n_layers]`` is the last block's output.
        calls: ``calls[l] = (args, kwargs)`` the model passed block ``l``.
        batch_size: rows of the recorded batch.
    """

    inputs: list[torch.Tensor]
    calls: list[tuple[tuple, dict]]
    batch_size: int

    def resid(self, layer: int) -> torch.Tensor:
        """Residual stream at residual index ``layer`` (0..n_layers)."""
        return self.inputs[layer]


def record(
    model, inputs: dict[str, torch.Tensor], *, upto: int | None = None, check_finite: bool = True
) -> Recording:
    """Run the base model (no LM head) once and record every block's input and call arguments.

    ``upto``: stop after recording block ``upto``'s input (saves the rest of the pass; then
    ``inputs`` has ``upto + 1`` entries). Runs without gradients. ``check_finite``: raise a
    :class:`~medmap.errors.MedmapError` naming the first residual layer whose real (unpadded)
    tokens hold NaN/inf, e.g. after a float16 overflow.
    """
    adapter = model.adapter
    n = adapter.n_layers
    last = n if upto is None else upto
    inputs_: list[torch.Tensor | None] = [None] * (n + 1)
    calls: list[tuple[tuple, dict] | None] = [None] * n
    handles = []

    def pre(idx):
        def hook(_m, args, kwargs):
            inputs_[idx] = block_input(args, kwargs).detach()
            calls[idx] = (args, dict(kwargs))
            if idx == last:
                raise _Stop

        return hook

    def post(_m, _args, output):
        inputs_[n] = block_output(output).detach()

    for i, block in enumerate(adapter.blocks):
        handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
    if last == n:
        handles.append(adapter.blocks[n - 1].register_forward_hook(post))
    base = getattr(model.hf, model.hf.base_model_prefix, None) or model.hf
    try:
        with torch.no_grad():
            base(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    batch = inputs["input_ids"].shape[0]
    if check_finite:
        check_finite_layers(inputs_[: last + 1], inputs.get("attention_mask"))
    return Recording(inputs=inputs_[: last + 1], calls=calls[: min(last + 1, n)], batch_size=batch)


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


def _repeat_value(name: str, value: Any, batch: int, times: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == batch:
            if name not in BATCH_MAJOR:
                raise _Unstackable(name)
            return value.repeat(times, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, tuple | list):
        return type(value)(_repeat_value(name, v, batch, times) for v in value)
    if isinstance(value, dict):
        return {k: _repeat_value(name, v, batch, times) for k, v in value.items()}
    return value


class _Unstackable(Exception):
    pass


def repeat_call(block, args: tuple, kwargs: dict, batch: int, times: int) -> tuple[tuple, dict]:
    """Block call arguments for a batch stacked ``times`` along dim 0 (hidden state excluded).

    Positional arguments are named through the block's signature; tensors whose first dimension
    equals ``batch`` are repeated only under a known batch-major name (:data:`BATCH_MAJOR`).
    Raises ``ValueError`` if some other argument is batch-major (stacking would be unsafe).
    """
    if times == 1:
        return args, kwargs
    names = _param_names(block)
    try:
        new_args = [args[0]] + [
            _repeat_value(names[i] if i < len(names) else "", a, batch, times)
            for i, a in enumerate(args[1:], start=1)
        ]
        new_kwargs = {
            k: (v if k == "hidden_states" else _repeat_value(k, v, batch, times))
            for k, v in kwargs.items()
        }
    except _Unstackable as e:
        raise ValueError(f"argument {e.args[0]!r} looks batch-major; cannot stack") from None
    return tuple(new_args), new_kwargs


def can_stack(model, rec: Recording, times: int = 2) -> bool:
    """Whether every recorded block call can be repeated along the batch (see :func:`repeat_call`)."""
    try:
        for block, (args, kwargs) in zip(model.adapter.blocks, rec.calls):
            repeat_call(block, args, kwargs, rec.batch_size, times)
    except ValueError:
        return False
    return True


def stacked_calls(model, rec: Recording, times: int) -> list[tuple[tuple, dict]]:
    """Every recorded block call repeated ``times`` along the batch (see :func:`repeat_call`)."""
    return [
        repeat_call(block, args, kwargs, rec.batch_size, times)
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
