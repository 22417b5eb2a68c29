"""Benchmark: per-item weight-gradient saliency with hook reduction vs plain ``loss.backward()``.

Plain: per item, ``backward()`` keeps every gradient, then each is reduced to |g| and |g·w| sums.
medmap: :func:`medmap.techniques.saliency_items` (each gradient reduced and freed by a
post-accumulate-grad hook). Reports wall time, gradient bytes alive at the peak (counted
exactly: all gradients for the plain path, the hook's live counter for medmap; in-process RSS is
not reported because allocator reuse makes it order-dependent), and the largest relative disagreement of the per-part sums.

    .venv/bin/python benchmarks/saliency.py --model smollm2-135m --n 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _causal_data import FACTS

import medmap
from medmap.techniques import saliency_items
from medmap.techniques.saliency import item_loss, param_groups


def plain(model, prompts, targets) -> tuple[np.ndarray, int]:
    """Per-item, per-group sum |g| ``(n_items, n_groups)`` with plain backward; live grad bytes."""
    pg = param_groups(model)
    gidx = {g: j for j, g in enumerate(pg.groups)}
    flags = [p.requires_grad for p in pg.params]
    for p in pg.params:
        p.requires_grad_(True)
    out = np.zeros((len(prompts), len(pg.groups)))
    live = 0
    for i, (p_, t) in enumerate(zip(prompts, targets)):
        item_loss(model, p_, t).backward()
        live = max(
            live,
            sum(p.grad.numel() * p.grad.element_size() for p in pg.params if p.grad is not None),
        )
        for p, g in zip(pg.params, pg.group_of):
            if p.grad is not None:
                out[i, gidx[g]] += p.grad.abs().sum(dtype=torch.float64).item()
                (p.grad * p.detach()).abs().sum(dtype=torch.float64).item()  # same work as medmap
                p.grad = None
    for p, f in zip(pg.params, flags):
        p.requires_grad_(f)
    return out, live


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_args()
    model = medmap.load_model(args.model)
    items = (FACTS * (args.n // len(FACTS) + 1))[: args.n]
    prompts, targets = [p for p, _ in items], [t for _, t in items]
    saliency_items(model, prompts[:1], targets[:1])  # warm-up both paths
    plain(model, prompts[:1], targets[:1])
    t0 = time.perf_counter()
    df = saliency_items(model, prompts, targets)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref, live = plain(model, prompts, targets)
    t_plain = time.perf_counter() - t0
    pg = param_groups(model)
    parts = df[df["module"] != "block"].pivot(
        index="item", columns=["layer", "module"], values="grad_abs_sum"
    )
    fast = parts[[g for g in pg.groups]].to_numpy()
    rel = float(np.nanmax(np.abs(fast - ref) / np.maximum(np.abs(ref), 1e-30)))
    print(
        f"model={args.model} items={args.n} params={sum(p.numel() for p in pg.params) / 1e6:.1f}M"
    )
    print(f"plain backward : {t_plain:7.2f} s  live grad bytes {live / 2**20:8.1f} MiB")
    print(
        f"medmap hooks   : {t_fast:7.2f} s  live grad bytes {df.attrs['peak_grad_bytes'] / 2**20:8.1f} MiB"
    )
    print(f"max relative difference of per-part sum|g| : {rel:.1e}")


if __name__ == "__main__":
    main()
