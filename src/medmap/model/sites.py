"""One scoped trace context with named sites (in the spirit of TransformerLens hook points).

A *site* is a named activation of one block ``b`` (0-based), see docs/sites.md:

* ``resid_pre.b``: the residual stream block ``b`` is called with (its input hidden state);
* ``resid_post.b``: block ``b``'s output hidden state (= ``resid_pre.(b+1)``);
* ``attn_out.b``: the attention sub-module's output (first element of its tuple) *before* the
  block adds it to the residual stream (and before any post-attention norm, Gemma3 / OLMo2);
* ``mlp_out.b``: the MLP sub-module's output likewise; for a mixture-of-experts block, the
  mixture's output (router-weighted sum of the experts).

:class:`Trace` reads (``reduce``, ``positions``), replaces (``replace``, ``edit``) and ablates
(``ablate``: ``block.b`` = bypass the block, ``attn_out.b`` / ``mlp_out.b`` = zero the
sub-module's output) sites, and can end the forward pass early (``stop_after``). Every
technique in medmap uses it; :class:`TraceBlocks` and :class:`SkipBlocks` are thin uses of it.

Residual indices (used by capture, lesioning, patching): index ``0`` is the input of block 0 (the
embedding output exactly as the first block sees it, e.g. already scaled for Gemma), and index
``l`` (1..n_layers) is the output of block ``l - 1``, i.e. the residual stream after ``l``
blocks, *before* the final norm (:func:`resid_site`). Every context removes its hooks on exit,
also when the body raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from medmap.errors import MedmapError
from medmap.model.adapter import LayerAdapter

Reduce = Callable[[Any, torch.Tensor], Any]
Edit = Callable[[Any, torch.Tensor], torch.Tensor | None]

SITE_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
ABLATE_KINDS = ("block", "attn_out", "mlp_out")
_ALIASES = {"attn": "attn_out", "mlp": "mlp_out", "resid": "resid_pre"}
# lesion/patch ``site`` option -> site kind
SUBMODULE_SITES = {"block": "block", "attn": "attn_out", "mlp": "mlp_out"}


@dataclass(frozen=True, order=True)
class Site:
    """A named activation: ``kind`` (one of :data:`SITE_KINDS`, or ``"block"`` for ablation)
    of block ``layer`` (0-based). ``str(Site("attn_out", 3)) == "attn_out.3"``."""

    kind: str
    layer: int

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @classmethod
    def parse(cls, site: Site | str | tuple[str, int]) -> Site:
        """``Site`` from ``"attn_out.3"`` (aliases ``attn.3``, ``mlp.3``), ``("mlp_out", 3)``."""
        if isinstance(site, Site):
            return site
        if isinstance(site, tuple):
            kind, layer = site
        else:
            kind, _, layer = str(site).rpartition(".")
        kind = _ALIASES.get(kind, kind)
        try:
            layer = int(layer)
        except (TypeError, ValueError):
            layer = None
        if kind not in (*SITE_KINDS, "block") or layer is None:
            raise MedmapError(
                f"unknown site {site!r}",
                hint="use <kind>.<block>, kind one of " + ", ".join((*SITE_KINDS, "block")),
            )
        return cls(kind, layer)

    @property
    def resid_index(self) -> int:
        """The first residual index this site's value feeds (``resid_pre.b`` → ``b``, the
        others → ``b + 1``)."""
        return self.layer if self.kind == "resid_pre" else self.layer + 1


def resid_site(index: int, n_layers: int) -> Site:
    """The site of residual index ``index`` (``0..n_layers-1`` → ``resid_pre``, ``n_layers`` →
    ``resid_post`` of the last block)."""
    return Site("resid_pre", index) if index < n_layers else Site("resid_post", n_layers - 1)


def _zero_like_output(output: Any) -> Any:
    return with_block_output(output, torch.zeros_like(block_output(output)))


class _Stop(Exception):
    """Raised from a hook to end the forward pass after ``stop_after``; caught by :class:`Trace`."""


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


class Trace(_HookContext):
    """Read, replace and ablate named sites during a forward pass (see the module docstring).

    Args:
        adapter: the model's :class:`~medmap.model.adapter.LayerAdapter`.
        sites: sites to read (``Site`` or ``"resid_post.3"``); their values land in
            ``self.values[site]`` (also ``trace["resid_post.3"]``).
        reduce: ``reduce(site, hidden)`` with ``hidden`` ``(batch, seq, d_model)``; its return
            value is stored (default: a detached copy, or the rows at ``positions``). Reduce in
            the hook to keep only what you need in memory.
        positions: what the default ``reduce`` keeps: ``None`` = all positions, a long tensor
            of one column per row (→ ``(batch, d_model)``) or a bool mask ``(batch, seq)``
            (→ ``(n_selected, d_model)``).
        edit: ``edit(site, hidden)`` returns a replacement of the same shape or ``None``; called
            for the read sites and the ``replace`` sites.
        replace: ``{site: (value, mask)}``: ``hidden`` becomes ``where(mask[..., None], value,
            hidden)``; ``value`` ``(batch, seq, d_model)``, ``mask`` ``(batch, seq)`` bool, or
            ``None`` for every position.
        ablate: sites to remove: ``block.b`` (block ``b`` passes its input through, = deleting
            it), ``attn_out.b`` / ``mlp_out.b`` (the sub-module's output set to zero).
        stop_after: end the forward pass right after this site has been computed (read and
            edited); the exception is caught when the context exits, so ``with Trace(...):
            model(...)`` simply returns early.
        calls: keep every block's call ``(args, kwargs)`` in ``self.calls[b]`` (for replay).

    Order inside one hook: ablate, replace, edit, reduce. Sites are validated on construction.
    """

    def __init__(
        self,
        adapter: LayerAdapter,
        sites: Iterable[Site | str] = (),
        *,
        reduce: Reduce | None = None,
        positions: torch.Tensor | None = None,
        edit: Edit | None = None,
        replace: Mapping[Site | str, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
        ablate: Iterable[Site | str] = (),
        stop_after: Site | str | None = None,
        calls: bool = False,
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.sites = [self._check(Site.parse(s)) for s in sites]
        self.replace = {self._check(Site.parse(k)): v for k, v in (replace or {}).items()}
        self.ablate = {self._check(Site.parse(s)) for s in ablate}
        bad = [s for s in (*self.sites, *self.replace) if s.kind not in SITE_KINDS]
        if bad:
            raise MedmapError(
                f"site {bad[0]} cannot be read or replaced",
                hint="read resid_pre.b, resid_post.b, attn_out.b, mlp_out.b; ablate block.b",
            )
        bad = [s for s in self.ablate if s.kind not in ABLATE_KINDS]
        if bad:
            raise MedmapError(
                f"cannot ablate site {bad[0]}", hint="ablate block.b, attn_out.b, mlp_out.b"
            )
        self.stop_after = None if stop_after is None else self._check(Site.parse(stop_after))
        self.reduce = reduce
        self.positions = positions
        self.edit = edit
        self.record_calls = calls
        self.values: dict[Any, Any] = {}
        self.calls: dict[int, tuple[tuple, dict]] = {}

    def _check(self, site: Site) -> Site:
        n = self.adapter.n_layers
        if not 0 <= site.layer < n:
            raise MedmapError(
                f"block index {site.layer} is out of range (site {site})",
                hint=f"this model has blocks 0..{n - 1}",
            )
        return site

    def _key(self, site: Site) -> Any:
        return site

    def __getitem__(self, site: Site | str) -> Any:
        return self.values[self._key(Site.parse(site))]

    def __exit__(self, exc_type, exc, tb) -> bool:
        super().__exit__(exc_type, exc, tb)
        # swallow only this context's own stop (a nested Trace lets an outer one's pass)
        return isinstance(exc, _Stop) and exc.args[0] is self

    def _default_reduce(self, _key, h: torch.Tensor):
        p = self.positions
        if p is None:
            return h.detach().clone()
        if p.dtype == torch.bool:
            return h[p.to(h.device)].detach().clone()
        return h[torch.arange(h.shape[0], device=h.device), p.to(h.device)].detach().clone()

    def _apply(self, site: Site, hidden: torch.Tensor) -> torch.Tensor | None:
        """Replacement for ``hidden`` at ``site`` (``None`` = unchanged); stores the read value."""
        new = None
        if site in self.replace:
            value, mask = self.replace[site]
            value = value.to(hidden.device, hidden.dtype)
            new = (
                value.expand_as(hidden).clone()
                if mask is None
                else torch.where(mask.to(hidden.device)[..., None], value, hidden)
            )
        read = site in self._read
        if self.edit is not None and (read or site in self.replace):
            edited = self.edit(self._key(site), hidden if new is None else new)
            new = edited if edited is not None else new
        if read:
            h = hidden if new is None else new
            reduce = self.reduce if self.reduce is not None else self._default_reduce
            self.values[self._key(site)] = reduce(self._key(site), h)
        return new

    def _register(self) -> list[RemovableHandle]:
        ad = self.adapter
        self._read = set(self.sites)
        wanted = self._read | set(self.replace) | self.ablate
        if self.stop_after is not None:
            wanted.add(self.stop_after)
        handles = []
        for b in sorted(
            {s.layer for s in wanted} | (set(range(ad.n_layers)) if self.record_calls else set())
        ):
            pre, post = Site("resid_pre", b), Site("resid_post", b)
            if self.record_calls or pre in wanted:
                handles.append(
                    ad.blocks[b].register_forward_pre_hook(self._pre_hook(b), with_kwargs=True)
                )
            if post in wanted or Site("block", b) in wanted:
                handles.append(
                    ad.blocks[b].register_forward_hook(self._post_hook(b), with_kwargs=True)
                )
            for kind, module in (("attn_out", ad.attn), ("mlp_out", ad.mlp)):
                if Site(kind, b) in wanted:
                    handles.append(module(b).register_forward_hook(self._sub_hook(Site(kind, b))))
        return handles

    def _pre_hook(self, b: int):
        site = Site("resid_pre", b)

        def hook(_m, args, kwargs):
            if self.record_calls:
                self.calls[b] = (args, dict(kwargs))
            new = self._apply(site, block_input(args, kwargs))
            if self.stop_after == site:
                raise _Stop(self)
            return None if new is None else with_block_input(args, kwargs, new)

        return hook

    def _post_hook(self, b: int):
        site = Site("resid_post", b)
        bypass = Site("block", b) in self.ablate

        def hook(_m, args, kwargs, output):
            if bypass:
                output = with_block_output(output, block_input(args, kwargs))
            new = self._apply(site, block_output(output))
            if self.stop_after in (site, Site("block", b)):
                raise _Stop(self)
            if new is not None:
                return with_block_output(output, new)
            return output if bypass else None

        return hook

    def _sub_hook(self, site: Site):
        zero = site in self.ablate

        def hook(_m, _args, output):
            if zero:
                output = _zero_like_output(output)
            new = self._apply(site, block_output(output))
            if self.stop_after == site:
                raise _Stop(self)
            if new is not None:
                return with_block_output(output, new)
            return output if zero else None

        return hook


class TraceBlocks(Trace):
    """Read (``reduce``) and optionally replace (``edit``) the residual stream at chosen layers.

    A :class:`Trace` over residual indices (see module docstring) instead of named sites.

    Args:
        adapter: the model's :class:`LayerAdapter`.
        layers: residual indices 0..n_layers; ``None`` = all.
        reduce: ``reduce(layer, hidden)`` with ``hidden`` of shape ``(batch, seq, d_model)``;
            its return value is stored in ``self.values[layer]`` (default: a detached copy).
        edit: ``edit(layer, hidden)`` returns a replacement tensor of the same shape (or
            ``None`` to leave it). Edits happen before ``reduce`` sees the tensor.
        stop_after: end the forward pass once residual index ``stop_after`` has been read.

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
        stop_after: int | None = None,
    ) -> None:
        n = adapter.n_layers
        self.layers = check_layers(layers, n)
        super().__init__(
            adapter,
            [resid_site(x, n) for x in self.layers],
            reduce=reduce,
            edit=edit,
            stop_after=None if stop_after is None else resid_site(stop_after, n),
        )

    def _key(self, site: Site) -> int:
        return site.resid_index if site.kind in ("resid_pre", "resid_post") else site


class SkipBlocks(Trace):
    """Lesion: blocks ``indices`` (0-based block numbers) pass their input through unchanged.

    Equivalent to deleting those blocks from the block list (the following blocks receive the
    same hidden state and the same masks / position embeddings).
    """

    def __init__(self, adapter: LayerAdapter, indices: Sequence[int]) -> None:
        self.indices = list(indices)
        super().__init__(adapter, ablate=[Site("block", int(i)) for i in self.indices])


def ablation_sites(site: str, blocks: Iterable[int]) -> list[Site]:
    """Sites that lesion ``site`` (``"block"``, ``"attn"`` or ``"mlp"``) of each of ``blocks``."""
    kind = submodule_kind(site)
    return [Site(kind, int(b)) for b in blocks]


def submodule_kind(site: str) -> str:
    """Site kind of a lesion/patch ``site`` option (``block``, ``attn``, ``mlp``)."""
    if site not in SUBMODULE_SITES:
        raise MedmapError(f"unknown site {site!r}", hint="use block, attn or mlp")
    return SUBMODULE_SITES[site]


def count_hooks(module: nn.Module) -> int:
    """Number of forward (pre-)hooks registered anywhere under ``module`` (for leak checks)."""
    total = 0
    for m in module.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return total
