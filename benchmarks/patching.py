"""Benchmark: activation patching of every residual layer × 3 positions × 64 pairs.

Naive: the clean run recorded once per batch with :class:`medmap.hooks.TraceBlocks`, then one
full HF forward of the corrupt batch per (layer, position) cell with a TraceBlocks edit hook.
medmap: :func:`medmap.causal.patch` (both runs recorded once per batch; each layer replays only
the blocks after it, the 3 positions stacked along the batch, logits at the last token only).
Same pairs and batches; reports wall time, ratio and the largest logit-difference disagreement.

    .venv/bin/python benchmarks/patching.py --model smollm2-135m --pairs 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _causal_data import pairs

import medmap
from medmap.causal import answer_token, patch
from medmap.causal.patching import position_masks
from medmap.hooks import TraceBlocks
from medmap.tokens import encode

POSITIONS = ["last", "concept", "all"]


def naive(model, data: dict, batch_size: int) -> np.ndarray:
    """Patched logit differences ``(layers, positions, pairs)``, one full forward per cell."""
    n = model.n_layers
    tok = model.tokenizer
    n_pairs = len(data["clean_prompts"])
    out = np.zeros((n + 1, len(POSITIONS), n_pairs))
    a = torch.tensor(
        [answer_token(tok, p, t) for p, t in zip(data["clean_prompts"], data["clean_targets"])]
    )
    b = torch.tensor(
        [answer_token(tok, p, t) for p, t in zip(data["corrupt_prompts"], data["corrupt_targets"])]
    )
    for s in range(0, n_pairs, batch_size):
        sl = slice(s, min(n_pairs, s + batch_size))
        cb = encode(tok, data["clean_prompts"][sl])
        xb = encode(tok, data["corrupt_prompts"][sl])
        masks = position_masks(cb, xb, POSITIONS, data["concept_spans"][sl])
        with torch.no_grad(), TraceBlocks(model.adapter) as tr:
            model.hf(**cb.model_inputs(), use_cache=False)
        last = torch.tensor(cb.lengths) - 1
        rows = torch.arange(len(last))
        for layer in range(n + 1):
            for j, pos in enumerate(POSITIONS):
                m = masks[pos][..., None]

                def edit(_l, h, _m=m, _v=tr.values[layer]):
                    return torch.where(_m, _v, h)

                with torch.no_grad(), TraceBlocks(model.adapter, [layer], edit=edit):
                    logits = model.hf(**xb.model_inputs(), use_cache=False).logits[rows, last]
                out[layer, j, sl] = (logits[rows, a[sl]] - logits[rows, b[sl]]).double().numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    model = medmap.load_model(args.model)
    data = pairs(model.tokenizer, args.pairs)
    small = {k: v[:2] for k, v in data.items()}
    naive(model, small, 2)  # warm-up both paths
    patch(model, positions=POSITIONS, layers=[0, model.n_layers], **small)
    t0 = time.perf_counter()
    ref = naive(model, data, args.batch_size)
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    df = patch(model, positions=POSITIONS, batch_size=args.batch_size, **data)
    t_fast = time.perf_counter() - t0
    fast = np.zeros_like(ref)
    for j, pos in enumerate(POSITIONS):
        sel = df[df["position"] == pos]
        fast[:, j, :] = sel.pivot(
            index="layer", columns="pair", values="logit_diff_patched"
        ).to_numpy()
    diff = float(np.abs(fast - ref).max())
    cells = (model.n_layers + 1) * len(POSITIONS)
    print(
        f"model={args.model} residual layers={model.n_layers + 1} positions={len(POSITIONS)} "
        f"pairs={args.pairs} batch={args.batch_size} cells={cells} threads={torch.get_num_threads()}"
    )
    print(f"naive per-cell hook loop : {t_naive:8.2f} s")
    print(f"medmap.causal.patch      : {t_fast:8.2f} s   ratio {t_fast / t_naive:.2f}x")
    print(f"max |logit-diff difference| : {diff:.2e}")


if __name__ == "__main__":
    main()
