"""Reduce each weight gradient to two float64 sums the moment autograd has finished it.

:class:`GradReducer` keeps, per parameter ``k`` of a fixed list, ``sum |g|`` and ``sum |g · w|``
of the gradient of the last backward pass, and frees every gradient at once, so at most one
parameter's gradient is alive at a time (peak ≈ the largest single gradient, not all of them).

Two kinds of parameters are covered:

* **resident** weights (on any device, e.g. split over GPUs with ``device_map``): a
  post-accumulate-grad hook on the parameter itself;
* **offloaded** weights (accelerate's CPU/disk offload, the parameter is on ``meta`` between
  calls): accelerate's ``AlignDevicesHook`` puts a fresh copy of the weight into the module just
  before its forward and puts ``meta`` back afterwards, so gradients land on that short-lived
  copy, never on the parameter. :class:`GradReducer` therefore wraps the module's
  ``_old_forward`` (called by accelerate after the weights are materialised) and watches each
  materialised copy. A weight materialised several times in one pass (a module called twice)
  gets the sum of its copies' gradients before it is reduced, so the sums are exact in every case.

All hooks and wrappers are removed by :meth:`GradReducer.remove` (use the reducer as a context
manager), also on exceptions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medmap.model.adapter import (
    offloaded_modules,  # re-exported: accelerate's hooks are the adapter's business
    restore_offloaded_forward,
    wrap_offloaded_forward,
)

__all__ = ["GradReducer", "offloaded_modules"]

_CHUNK = 1 << 22  # elements per slice when reducing |g * w| of a large tensor


class GradReducer:
    """Per-parameter ``(sum |g|, sum |g·w|)`` of each backward pass, gradients freed at once.

    Args:
        params: the distinct parameters to watch, in the order of the output arrays.
        root: the module the parameters belong to; needed (with ``names``) to watch offloaded
            weights.
        names: for each parameter index, every qualified name it has in ``root`` (tied weights
            have several).
        splits: parameter index -> ``n``: also reduce that gradient in ``n`` equal slices along
            dim 0 (fused mixture-of-experts weights, one slice per expert).

    Attributes:
        peak: most gradient bytes alive at once so far (exact count, not RSS).
        slices: after :meth:`take`, parameter index -> ``(sum |g|, sum |g·w|)`` per slice
            (float64 arrays of length ``n``) for the ``splits`` parameters the pass reached.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        root: torch.nn.Module | None = None,
        names: Sequence[Sequence[str]] | None = None,
        splits: dict[int, int] | None = None,
    ) -> None:
        self.params = list(params)
        self.splits = dict(splits or {})
        self.sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slice_sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.slices: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.live = 0
        self.peak = 0
        self._handles: list = []
        self._n_fixed = 0
        self._wrapped: list[tuple[torch.nn.Module, object]] = []
        # offloaded copies of this pass: id -> (k, tensor); their use count and pending sums
        self._copies: dict[int, tuple[int, torch.Tensor]] = {}
        self._uses: dict[int, int] = {}
        self._pending: dict[int, tuple[int, torch.Tensor]] = {}
        try:
            for k, p in enumerate(self.params):
                if p.device.type != "meta":
                    self._handles.append(p.register_post_accumulate_grad_hook(self._leaf_hook(k)))
            self._n_fixed = len(self._handles)
            if root is not None and names is not None:
                index = {n: k for k, ns in enumerate(names) for n in ns}
                for mname, mod, recurse in offloaded_modules(root):
                    self._wrap(mod, mname, recurse, index)
        except BaseException:
            self.remove()
            raise

    def __enter__(self) -> GradReducer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- reduction -------------------------------------------------------------------------
    def _reduce(self, k: int, g: torch.Tensor, w: torch.Tensor) -> None:
        with torch.no_grad():
            sg = g.abs().sum(dtype=torch.float64)
            gf, wf = g.reshape(-1), w.detach().reshape(-1)
            sgw = torch.zeros((), dtype=torch.float64, device=g.device)
            for s in range(0, gf.numel(), _CHUNK):
                sgw += (
                    (gf[s : s + _CHUNK].float() * wf[s : s + _CHUNK].float())
                    .abs()
                    .sum(dtype=torch.float64)
                )
        prev = self.sums.get(k)
        self.sums[k] = (sg, sgw) if prev is None else (prev[0] + sg, prev[1] + sgw)
        if k in self.splits:
            with torch.no_grad():
                n = self.splits[k]
                gs, ws = g.detach().reshape(n, -1), w.detach().reshape(n, -1)
                vg = gs.abs().sum(1, dtype=torch.float64)
                vgw = (gs.float() * ws.float()).abs().sum(1, dtype=torch.float64)
            prev = self._slice_sums.get(k)
            self._slice_sums[k] = (vg, vgw) if prev is None else (prev[0] + vg, prev[1] + vgw)

    def _count(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _reduce_one(self, k: int, g: torch.Tensor, w: torch.Tensor) -> None:
        """Reduce a gradient that is alive only for this call (counted in ``live``/``peak``)."""
        nbytes = g.numel() * g.element_size()
        self._count(nbytes)
        self._reduce(k, g, w)
        self.live -= nbytes

    def _leaf_hook(self, k: int):
        def hook(p: torch.Tensor) -> None:
            g, p.grad = p.grad, None
            self._reduce_one(k, g, p)

        return hook

    # -- offloaded weights -----------------------------------------------------------------
    def _wrap(self, mod: torch.nn.Module, mname: str, recurse: bool, index: dict) -> None:
        prefix = f"{mname}." if mname else ""

        def wrap(inner):
            def forward(*args, **kwargs):
                if torch.is_grad_enabled():
                    for pname, t in mod.named_parameters(recurse=recurse):
                        k = index.get(prefix + pname)
                        if k is not None and t.requires_grad and t.device.type != "meta":
                            self._watch(k, t)
                return inner(*args, **kwargs)

            return forward

        self._wrapped.append((mod, wrap_offloaded_forward(mod, wrap)))

    def _watch(self, k: int, t: torch.Tensor) -> None:
        """Reduce the gradient of ``t``, a materialised copy of parameter ``k``, when it is done."""
        if id(t) in self._copies:  # the same copy reused (accelerate's tied-weights map)
            return
        self._copies[id(t)] = (k, t)  # keeps t alive, so its id stays unique this pass
        self._uses[k] = self._uses.get(k, 0) + 1
        if t.is_leaf:
            self._handles.append(t.register_post_accumulate_grad_hook(self._copy_leaf_hook(k)))
        else:  # e.g. ``Parameter(cpu).to("cuda")`` is not a leaf: take its gradient directly
            self._handles.append(t.register_hook(self._copy_grad_hook(k, t)))

    def _copy_leaf_hook(self, k: int):
        def hook(t: torch.Tensor) -> None:
            g = t.grad
            t.grad = None
            self._copy_done(k, g, t)

        return hook

    def _copy_grad_hook(self, k: int, t: torch.Tensor):
        def hook(g: torch.Tensor) -> None:
            self._copy_done(k, g, t)

        return hook

    def _copy_done(self, k: int, g: torch.Tensor, t: torch.Tensor) -> None:
        if self._uses[k] == 1:
            self._reduce_one(k, g, t)
            return
        nbytes = g.numel() * g.element_size()
        n, acc = self._pending.get(k, (0, None))
        if acc is None:
            self._count(nbytes)
            acc = g.detach().clone()
        else:
            acc += g.to(acc.device)
        if n + 1 == self._uses[k]:
            self._reduce(k, acc, t)
            self.live -= nbytes
            self._pending.pop(k, None)
        else:
            self._pending[k] = (n + 1, acc)

    # -- results ---------------------------------------------------------------------------
    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-parameter sums of the last backward pass (zeros for unreached ones); resets.

        Returns two float64 arrays of shape ``(len(params),)``: ``sum |g|`` and ``sum |g·w|``.
        """
        for k, (_, acc) in list(self._pending.items()):  # copies whose other uses got no grad
            self._reduce(k, acc, self._any_copy(k))
            self.live -= acc.numel() * acc.element_size()
        sg = np.zeros(len(self.params))
        sgw = np.zeros(len(self.params))
        for k, (a, b) in self.sums.items():
            sg[k] = float(a.cpu())
            sgw[k] = float(b.cpu())
        self.slices = {
            k: (a.cpu().numpy(), b.cpu().numpy()) for k, (a, b) in self._slice_sums.items()
        }
        self._reset_pass()
        return sg, sgw

    def _any_copy(self, k: int) -> torch.Tensor:
        return next(t for kk, t in self._copies.values() if kk == k)

    def _reset_pass(self) -> None:
        self.sums, self._pending, self._uses = {}, {}, {}
        self._slice_sums = {}
        for h in self._handles[self._n_fixed :]:  # hooks of this pass's offloaded copies
            h.remove()
        del self._handles[self._n_fixed :]
        self._copies = {}

    def remove(self) -> None:
        """Remove every hook and restore every wrapped forward (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for mod, inner in reversed(self._wrapped):
            restore_offloaded_forward(mod, inner)
        self._wrapped = []
        self._copies, self._pending, self._uses = {}, {}, {}
