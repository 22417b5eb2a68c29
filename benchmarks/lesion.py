"""Benchmark: full single-block lesion sweep, medmap vs a naive hook loop vs nnsight.

Naive: for every layer, a full HF forward per batch with :class:`medmap.model.sites.SkipBlocks`.
nnsight: for every layer, one ``trace`` per batch that sets block ``b``'s output to its input
(the idiomatic nnsight lesion), full logits as usual. medmap: :func:`medmap.techniques.lesioning`
(intact pass recorded once per batch, each lesion replays only the blocks after it, logits only
at target positions). All on the same items and batches.

Before any timing the warm-up sweep of every method is compared with medmap on every
(layer, item) cell and the run aborts if an NLL differs by more than ``--tol`` nats. In each
repeat every batch of items runs all methods back to back in a rotating order (so load drift on
a shared machine hits them alike); a method's time for the repeat is the sum over batches.
Reported: median over repeats per method, the ratios of the medians, the range of the
per-repeat ratios and the spread of the per-batch ratios. ``--threads 1`` is advisable when
other jobs share the cores (oversubscribed OpenMP threads slow every method several-fold).

    .venv/bin/python benchmarks/lesion.py --model smollm2-135m --n 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from _causal_data import FACTS
from _peers import clock, median_times, nnsight_model, nnsight_version, rotations

import medmap
from medmap.model.sites import SkipBlocks
from medmap.model.targets import encode_targets, prediction_index
from medmap.techniques import lesion


def _nll(logits: torch.Tensor, rows, cols, toks, n_items: int) -> np.ndarray:
    logp = torch.log_softmax(logits[rows, cols].float(), -1)
    nll = -logp.gather(1, toks[:, None])[:, 0].double()
    return torch.zeros(n_items, dtype=torch.float64).index_add_(0, rows, nll).numpy()


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
            out[b, s : s + batch_size] = _nll(logits, rows, cols, toks, len(spans))
    return out


def nnsight_sweep(peer, model, prompts, targets, batch_size: int) -> np.ndarray:
    """Same as :func:`naive` with nnsight: one trace per (layer, batch), block output := input."""
    nn_model, blocks = peer
    out = np.zeros((model.n_layers, len(prompts)))
    for b in range(model.n_layers):
        for s in range(0, len(prompts), batch_size):
            batch, spans = encode_targets(
                model.tokenizer, prompts[s : s + batch_size], targets[s : s + batch_size]
            )
            rows, cols, toks, _ = prediction_index(spans)
            with torch.no_grad(), nn_model.trace(**batch.model_inputs(), use_cache=False):
                h = blocks[b].input  # read the input first: nnsight runs in execution order
                blocks[b].output = h
                logits = nn_model.output.logits.save()
            out[b, s : s + batch_size] = _nll(logits, rows, cols, toks, len(spans))
    return out


def medmap_sweep(model, prompts, targets, batch_size: int) -> np.ndarray:
    df = lesion(model, prompts, targets, batch_size=batch_size)
    return df.pivot(index="layer", columns="item", values="nll_lesioned").to_numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-3, help="max |NLL difference| in nats")
    ap.add_argument("--peers", default="naive,nnsight", help="comma list; medmap always runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    load_start = os.getloadavg()
    model = medmap.load_model(args.model)
    items = (FACTS * (args.n // len(FACTS) + 1))[: args.n]
    prompts, targets = [p for p, _ in items], [t for _, t in items]
    bs = args.batch_size
    methods = {"medmap": lambda p, t: medmap_sweep(model, p, t, bs)}
    if "naive" in peers:
        methods["naive"] = lambda p, t: naive(model, p, t, bs)
    peer = nnsight_model(model) if "nnsight" in peers else None
    if peer is not None:
        methods["nnsight"] = lambda p, t: nnsight_sweep(peer, model, p, t, bs)
    chunks = [(prompts[s : s + bs], targets[s : s + bs]) for s in range(0, args.n, bs)]

    def sweep(name: str) -> np.ndarray:
        return np.concatenate([methods[name](p, t) for p, t in chunks], axis=1)

    # warm-up doubles as the correctness check: every (layer, item) cell against medmap
    warm = {name: sweep(name) for name in methods}
    ref = warm["medmap"]
    diffs = {}
    for name, res in warm.items():
        if name == "medmap":
            continue
        diffs[name] = float(np.abs(res - ref).max())
        print(
            f"check {name:8s} vs medmap: max |NLL diff| {diffs[name]:.2e} nats on {ref.size} cells"
        )
        assert diffs[name] <= args.tol, f"{name} disagrees with medmap by {diffs[name]:.2e} nats"

    # timed: every repeat, every batch of items runs all methods back to back (rotating order)
    times: dict[str, list[float]] = {name: [] for name in methods}
    per_batch: dict[str, list[float]] = {name: [] for name in methods}
    order = rotations(list(methods))
    for _ in range(args.repeats):
        outs: dict[str, list[np.ndarray]] = {name: [] for name in methods}
        for p, t in chunks:
            for name in next(order):
                dt, res = clock(lambda name=name, p=p, t=t: methods[name](p, t))
                per_batch[name].append(dt)
                outs[name].append(res)
        for name in methods:
            times[name].append(sum(per_batch[name][-len(chunks) :]))
            assert float(np.abs(np.concatenate(outs[name], axis=1) - ref).max()) <= args.tol
    med = median_times(times)
    load = {"start": load_start, "end": os.getloadavg()}
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {load['end']}")

    print(
        f"model={args.model} layers={model.n_layers} items={args.n} batch={bs} "
        f"repeats={args.repeats} threads={torch.get_num_threads()} torch={torch.__version__}"
        + (f" nnsight={nnsight_version()}" if peer is not None else "")
    )
    print(
        "per-repeat seconds: "
        + ", ".join(f"{k}={[round(x, 2) for x in v]}" for k, v in times.items())
    )
    labels = {
        "naive": "naive SkipBlocks loop",
        "nnsight": "nnsight trace loop",
        "medmap": "medmap.techniques.lesioning",
    }
    for name in methods:
        print(f"{labels[name]:24s}: {med[name]:8.2f} s (median)")
    ratios = {}
    for peer_name in [n for n in methods if n != "medmap"]:
        per = [m / p for m, p in zip(times["medmap"], times[peer_name])]
        ratios[peer_name] = med["medmap"] / med[peer_name]
        pb = sorted(m / p for m, p in zip(per_batch["medmap"], per_batch[peer_name]))
        print(
            f"ratio medmap / {peer_name:8s}: {ratios[peer_name]:.3f}x of medians "
            f"(per repeat {min(per):.3f}-{max(per):.3f}; per batch of items min {pb[0]:.3f}, "
            f"median {np.median(pb):.3f}, max {pb[-1]:.3f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "times": times,
                    "seconds_per_batch": per_batch,
                    "median": med,
                    "loadavg": load,
                    "ratios": ratios,
                    "max_diff": diffs,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
