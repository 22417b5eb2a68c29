"""Saliency labels from the module tree; per-expert shares of mixture-of-experts blocks."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from medmap.model.targets import encode_targets
from medmap.techniques import saliency_items, saliency_summary
from medmap.techniques.saliency import param_groups
from tiny import ALL_ARCHS, MOE_ARCHS, make_tiny

PROMPTS = ["A 47-year-old woman presents with", "Metformin is a first-line treatment for"]
TARGETS = [" chest pain", " type 2 diabetes"]


def _old_name_guess(name: str) -> str:
    """The parameter-name guess saliency used before the adapter's taxonomy (for comparison)."""
    for comp in name.split(".")[:-1] or name.split("."):
        c = comp.lower()
        words = [w for w in re.split(r"[_\d]+", c) if w]
        if "attn" in c or "attention" in c:
            return "norm" if ("norm" in c or "ln" in words) else "attention"
        if "norm" in c or "ln" in words:
            return "norm"
        if any(s in c for s in ("mlp", "feed_forward", "ffn", "moe", "expert")):
            return "mlp"
    return "other"


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_module_tree_labels_equal_the_old_name_guess(arch):
    """Default-map saliency rows keep their labels: the module tree agrees on every supported
    architecture (and knows more: experts and routers)."""
    model = make_tiny(arch)
    pg = param_groups(model)
    ad = model.adapter
    path = ad.blocks_path
    for name, (layer, module) in zip(pg.names, pg.group_of):
        if name.startswith(path + "."):
            inner = name[len(path) + 1 :].split(".", 1)[1]
            assert module == _old_name_guess(inner), name
            assert layer == int(name[len(path) + 1 :].split(".")[0]) + 1
    kinds = {ad.param_kind(n) for n in pg.names}
    assert ("expert" in kinds) == (arch in MOE_ARCHS)


def _plain_expert_sums(model, prompt, target):
    """Per (layer, expert) sum |g| and |g·w| from a plain backward of the whole model."""
    pg = param_groups(model)
    for p in pg.params:
        p.requires_grad_(True)
        p.grad = None
    batch, spans = encode_targets(model.tokenizer, [prompt], [target])
    s = spans[0]
    logp = torch.log_softmax(model.hf(**batch.model_inputs()).logits[0].float(), -1)
    (-sum(logp[t - 1, s.ids[t]] for t in range(s.start, s.stop))).backward()
    out: dict[tuple[int, str], np.ndarray] = {}
    for k, layer, _e, n in pg.experts:
        g, w = pg.params[k].grad.double(), pg.params[k].detach().double()
        for j in range(n):
            acc = out.setdefault((layer, f"expert.{j}"), np.zeros(2))
            acc += [g[j].abs().sum().item(), (g[j] * w[j]).abs().sum().item()]
    for k, layer in pg.routers:
        g, w = pg.params[k].grad.double(), pg.params[k].detach().double()
        acc = out.setdefault((layer, "router"), np.zeros(2))
        acc += [g.abs().sum().item(), (g * w).abs().sum().item()]
    for p in pg.params:
        p.grad = None
        p.requires_grad_(False)
    return out


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_rows_equal_plain_backward_and_sum_to_the_mlp(arch):
    model = make_tiny(arch, seed=4)
    model.hf.requires_grad_(False)
    df = saliency_items(model, PROMPTS, TARGETS)
    n = model.n_layers
    mods = set(df["module"])
    assert {f"expert.{j}" for j in range(4)} | {"router", "mlp", "attention", "block"} <= mods
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        ref = _plain_expert_sums(model, p, t)
        d = df[df["item"] == i].set_index(["layer", "module"])
        for key, (sg, sgw) in ref.items():
            np.testing.assert_allclose(d.loc[key, "grad_abs_sum"], sg, rtol=1e-6)
            np.testing.assert_allclose(d.loc[key, "grad_x_weight_sum"], sgw, rtol=1e-6)
        for layer in range(1, n + 1):
            parts = [f"expert.{j}" for j in range(4)] + ["router"]
            for col in ("grad_abs_sum", "grad_x_weight_share", "numel"):
                np.testing.assert_allclose(
                    d.loc[[(layer, m) for m in parts], col].sum(),
                    d.loc[(layer, "mlp"), col],
                    rtol=1e-9,
                )
        # the experts get different gradients (top-2 of 4 routing): not one share split four ways
        shares = d.loc[[(1, f"expert.{j}") for j in range(4)], "grad_abs_share"].to_numpy()
        assert shares.max() > 1.1 * shares.min()
    tidy = saliency_summary(df, n_boot=20)
    assert {"expert.0", "router"} <= set(tidy["module"])
