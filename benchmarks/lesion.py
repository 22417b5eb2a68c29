"""Benchmark: full single-block lesion sweep vs a naive loop, on a bundled model.

Naive: for every layer, a full HF forward per batch with :class:`medmap.hooks.SkipBlocks`.
medmap: :func:`medmap.causal.lesion` (intact pass recorded once per batch, each lesion replays
only the blocks after it, logits only at target positions). Both on the same items and batches;
reports wall time (median of ``--repeats``), the ratio, and the largest NLL disagreement.

    .venv/bin/python benchmarks/lesion.py --model smollm2-135m --n 16 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _causal_data import FACTS

import medmap
from medmap.causal import lesion
from medmap.causal.targets import encode_targets, prediction_index
from medmap.hooks import SkipBlocks


def naive(model, prompts, targets, batch_size: int) -> np.ndarray:
    """NLL ``(n_layers, n_items)`` of every single-block lesion, one full forward per batch."""
    out = np.zeros((model.n_layers, len(prompts)))
    for b in range(model.n_layers):
        for s in range(0, len(prompts), batch_size):
            batch, spans = encode_targets(
                model.tokenizer, prompts[s : s + batch_size], targets[s : s + batch_size]
            )
            rows, cols, toks, _ = prediction_index(spans)
            with torch.no_grad(), SkipBlocks(model.adapter, [b]):
                logits = model.hf(**batch.model_inputs(), use_cache=False).logits
            logp = torch.log_softmax(logits[rows, cols].float(), -1)
            nll = -logp.gather(1, toks[:, None])[:, 0].double()
            out[b, s : s + batch_size] = (
                torch.zeros(len(spans), dtype=torch.float64).index_add_(0, rows, nll).numpy()
            )
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = medmap.load_model(args.model)
    items = (FACTS * (args.n // len(FACTS) + 1))[: args.n]
    prompts, targets = [p for p, _ in items], [t for _, t in items]
    t_naive, ref = timed(lambda: naive(model, prompts, targets, args.batch_size), args.repeats)
    t_fast, df = timed(
        lambda: lesion(model, prompts, targets, batch_size=args.batch_size), args.repeats
    )
    fast = df.pivot(index="layer", columns="item", values="nll_lesioned").to_numpy()
    diff = float(np.abs(fast - ref).max())
    print(
        f"model={args.model} layers={model.n_layers} items={args.n} batch={args.batch_size} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"naive SkipBlocks loop : {t_naive:8.2f} s")
    print(f"medmap.causal.lesion  : {t_fast:8.2f} s   ratio {t_fast / t_naive:.2f}x")
    print(f"max |NLL difference|  : {diff:.2e} nats")


if __name__ == "__main__":
    main()
