"""Scoped hooks on the residual stream (in the spirit of baukit's ``TraceDict``).

Layer indices follow one convention everywhere in medmap: residual index ``0`` is the input of
block 0 (the embedding output exactly as the first block sees it, e.g. already scaled for Gemma),
and index ``l`` (1..n_layers) is the output of block ``l - 1``, i.e. the residual stream after
``l`` blocks, *before* the final norm. Every context removes its hooks on exit, also when the body
raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from medmap.adapter import LayerAdapter
from medmap.errors import MedmapError

Reduce = Callable[[int, torch.Tensor], Any]
Edit = Callable[[int, torch.Tensor], torch.Tensor | None]


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state tensor a block was called with (positional or ``hidden_states=``)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("block called without a hidden_states tensor")


def with_block_input(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the hidden-state tensor replaced by ``hidden``."""
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def block_output(output: Any) -> torch.Tensor:
    """The hidden-state tensor in a block's output (a tensor, or the first element of a tuple)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def with_block_output(output: Any, hidden: torch.Tensor) -> Any:
    """A block output of the same structure as ``output`` carrying ``hidden``."""
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


def check_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    """Validate residual indices (0..n_layers); ``None`` means all of them."""
    if layers is None:
        return list(range(n_layers + 1))
    out = [int(x) for x in layers]
    bad = [x for x in out if not 0 <= x <= n_layers]
    if bad:
        raise MedmapError(
            f"layer index {bad[0]} is out of range",
            hint=f"this model has residual layers 0..{n_layers} (0 = embeddings)",
        )
    return out


class _HookContext:
    """Registers hooks on ``__enter__`` and removes every one of them on ``__exit__``."""

    def __init__(self) -> None:
        self._stack: ExitStack | None = None

    def _register(self) -> list[RemovableHandle]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self):
        self._stack = ExitStack()
        try:
            for handle in self._register():
                self._stack.callback(handle.remove)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        assert self._stack is not None
        self._stack.close()
        self._stack = None
        return False

    @property
    def active(self) -> bool:
        return self._stack is not None


class TraceBlocks(_HookContext):
    """Read (``reduce``) and optionally replace (``edit``) the residual stream at chosen layers.

    Args:
        adapter: the model's :class:`LayerAdapter`.
        layers: residual indices 0..n_layers (see module docstring); ``None`` = all.
        reduce: ``reduce(layer, hidden)`` with ``hidden`` of shape ``(batch, seq, d_model)``;
            its return value is stored in ``self.values[layer]`` (default: a detached copy).
            Reduce inside the hook to keep only the positions you need in memory.
        edit: ``edit(layer, hidden)`` returns a replacement tensor of the same shape (or
            ``None`` to leave it). Edits happen before ``reduce`` sees the tensor.

    Example::

        with TraceBlocks(adapter, [0, 5], reduce=lambda l, h: h[:, -1].detach()) as tr:
            model(**batch)
        last5 = tr.values[5]
    """

    def __init__(
        self,
        adapter: LayerAdapter,
        layers: Iterable[int] | None = None,
        *,
        reduce: Reduce | None = None,
        edit: Edit | None = None,
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.layers = check_layers(layers, adapter.n_layers)
        self.reduce = reduce if reduce is not None else (lambda _l, h: h.detach().clone())
        self.edit = edit
        self.values: dict[int, Any] = {}

    def _apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        new = self.edit(layer, hidden) if self.edit is not None else None
        self.values[layer] = self.reduce(layer, hidden if new is None else new)
        return new

    def _register(self) -> list[RemovableHandle]:
        handles = []
        blocks = self.adapter.blocks
        for layer in self.layers:
            if layer == 0:

                def pre_hook(_m, args, kwargs, _layer=layer):
                    new = self._apply(_layer, block_input(args, kwargs))
                    return None if new is None else with_block_input(args, kwargs, new)

                handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:

                def hook(_m, _args, output, _layer=layer):
                    new = self._apply(_layer, block_output(output))
                    return None if new is None else with_block_output(output, new)

                handles.append(blocks[layer - 1].register_forward_hook(hook))
        return handles


class SkipBlocks(_HookContext):
    """Lesion: blocks ``indices`` (0-based block numbers) pass their input through unchanged.

    Equivalent to deleting those blocks from the block list (the following blocks receive the
    same hidden state and the same masks / position embeddings).
    """

    def __init__(self, adapter: LayerAdapter, indices: Sequence[int]) -> None:
        super().__init__()
        bad = [i for i in indices if not 0 <= i < adapter.n_layers]
        if bad:
            raise MedmapError(
                f"block index {bad[0]} is out of range",
                hint=f"this model has blocks 0..{adapter.n_layers - 1}",
            )
        self.adapter = adapter
        self.indices = list(indices)

    def _register(self) -> list[RemovableHandle]:
        def hook(_m, args, kwargs, output):
            return with_block_output(output, block_input(args, kwargs))

        return [
            self.adapter.blocks[i].register_forward_hook(hook, with_kwargs=True)
            for i in self.indices
        ]


def count_hooks(module: nn.Module) -> int:
    """Number of forward (pre-)hooks registered anywhere under ``module`` (for leak checks)."""
    total = 0
    for m in module.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return total
