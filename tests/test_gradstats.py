"""GradReducer: exact gradient sums for resident, offloaded, reused and non-leaf weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from accelerate import cpu_offload

from medmap.techniques.saliency.gradstats import GradReducer, offloaded_modules


class Shared(torch.nn.Module):
    """``b(relu(a(relu(a(x)))))``: ``a`` is called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(6, 6)
        self.b = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


def _plain_sums(model, x):
    names = [n for n, _ in model.named_parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    model(x).square().sum().backward()
    g = {n: p.grad.double() for n, p in model.named_parameters()}
    w = {n: p.detach().double() for n, p in model.named_parameters()}
    return names, (
        np.array([g[n].abs().sum().item() for n in names]),
        np.array([(g[n] * w[n]).abs().sum().item() for n in names]),
    )


def _reduced_sums(model, x):
    named = list(model.named_parameters())
    params = [p for _, p in named]
    for p in params:
        p.requires_grad_(True)
    with GradReducer(params, model, [[n] for n, _ in named]) as red, torch.enable_grad():
        model(x).square().sum().backward()
        out = red.take()
        assert red.live == 0
    return [n for n, _ in named], out


def test_offloaded_module_called_twice_sums_both_copies():
    x = torch.randn(4, 6)
    plain = Shared()
    off = copy.deepcopy(plain)
    cpu_offload(off, execution_device="cpu")
    assert {n for n, _, _ in offloaded_modules(off)} >= {"a", "b"}
    assert off.a.weight.device.type == "meta"
    names_p, (g_p, gw_p) = _plain_sums(plain, x)
    names_o, (g_o, gw_o) = _reduced_sums(off, x)
    assert names_p == names_o
    assert (g_o > 0).all()
    np.testing.assert_allclose(g_o, g_p, rtol=1e-6)
    np.testing.assert_allclose(gw_o, gw_p, rtol=1e-6)


def test_resident_weights_equal_plain_backward_and_grads_are_freed():
    x = torch.randn(4, 6)
    model = Shared()
    names, (g_p, gw_p) = _plain_sums(copy.deepcopy(model), x)
    _, (g_r, gw_r) = _reduced_sums(model, x)
    np.testing.assert_allclose(g_r, g_p, rtol=1e-6)
    np.testing.assert_allclose(gw_r, gw_p, rtol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_non_leaf_copy_is_reduced_from_its_gradient():
    """On GPUs accelerate's copy can be ``Parameter(cpu).to(cuda)``, which is not a leaf."""
    w = torch.nn.Parameter(torch.randn(5, 5))
    x = torch.randn(3, 5)
    red = GradReducer([torch.nn.Parameter(torch.empty(5, 5, device="meta"))])
    try:
        copy_ = w * 1.0
        assert not copy_.is_leaf
        red._watch(0, copy_)
        (x @ copy_).sin().sum().backward()
        sg, sgw = red.take()
    finally:
        red.remove()
    ref = w.grad.double()
    assert sg[0] == pytest.approx(ref.abs().sum().item(), rel=1e-6)
    assert sgw[0] == pytest.approx((ref * w.detach().double()).abs().sum().item(), rel=1e-6)


def test_wrappers_removed_after_an_exception():
    off = Shared()
    cpu_offload(off, execution_device="cpu")
    before = {n: m._old_forward for n, m, _ in offloaded_modules(off)}
    params = list(off.parameters())
    with pytest.raises(RuntimeError, match="boom"), GradReducer(params, off, [["a.weight"]]):
        raise RuntimeError("boom")
    assert {n: m._old_forward for n, m, _ in offloaded_modules(off)} == before
