"""Benchmark: activation patching of every residual layer × 3 positions × 64 pairs.

Methods (same pairs, same batches, same position masks):

* naive: the clean run recorded once per batch with :class:`medmap.model.sites.TraceBlocks`, then one
  full HF forward of the corrupt batch per (layer, position) cell with a TraceBlocks edit hook.
* nnsight: the clean run recorded once per batch in one ``trace`` (every block's output saved),
  then one ``trace`` of the corrupt batch per (layer, position) cell that overwrites the
  residual stream at that layer and those positions with the clean values.
* transformer-lens: ``TransformerBridge`` (TransformerLens 4 replaced ``HookedTransformer``):
  ``run_with_cache`` on the clean batch, then ``run_with_hooks`` on the corrupt batch per cell
  with a hook on ``blocks.{l-1}.hook_resid_post`` (``blocks.0.hook_resid_pre`` for l = 0).
* medmap: :func:`medmap.techniques.patch` (both runs recorded once per batch; each layer replays
  only the blocks after it, the 3 positions stacked along the batch, logits at the last token).

Residual index ``l``: 0 = block 0's input, ``l`` = after block ``l-1``. Before timing, every
peer is run on the first batch at a few layers and compared with medmap (logit difference and
restored fraction); the run aborts on a disagreement above ``--tol``. The timed sweep is
interleaved: for each batch of pairs every method runs in turn (rotating order), so load drift
on a shared machine hits all methods alike; per-method time is the sum over batches. After the
sweep all cells are compared again.

    .venv/bin/python benchmarks/patching.py --model smollm2-135m --pairs 64
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from _causal_data import pairs
from _peers import clock, nnsight_model, nnsight_version, rotations, tl_bridge, tl_version

import medmap
from medmap.model.sites import TraceBlocks
from medmap.model.tokens import encode
from medmap.techniques import answer_token, patch
from medmap.techniques.patching import position_masks

POSITIONS = ["last", "concept", "all"]


class Chunk:
    """One batch of pairs, tokenised once (outside the timed region for every method alike)."""

    def __init__(self, model, data: dict) -> None:
        tok = model.tokenizer
        self.data = data
        self.cb = encode(tok, data["clean_prompts"])
        self.xb = encode(tok, data["corrupt_prompts"])
        self.masks = position_masks(self.cb, self.xb, POSITIONS, data["concept_spans"])
        self.last = torch.tensor(self.cb.lengths) - 1
        self.rows = torch.arange(len(self.last))
        self.a = torch.tensor(
            [answer_token(tok, p, t) for p, t in zip(data["clean_prompts"], data["clean_targets"])]
        )
        self.b = torch.tensor(
            [
                answer_token(tok, p, t)
                for p, t in zip(data["corrupt_prompts"], data["corrupt_targets"])
            ]
        )

    def ld(self, last_logits: torch.Tensor) -> np.ndarray:
        r = self.rows
        return (last_logits[r, self.a] - last_logits[r, self.b]).double().numpy()


def _result(out, ld_clean, ld_corrupt) -> dict[str, np.ndarray]:
    return {"patched": out, "clean": ld_clean, "corrupt": ld_corrupt}


def naive(model, ch: Chunk, layers: list[int]) -> dict[str, np.ndarray]:
    """Patched logit differences ``(layers, positions, pairs)``, one full forward per cell."""
    out = np.zeros((len(layers), len(POSITIONS), len(ch.last)))
    r, last = ch.rows, ch.last
    with torch.no_grad(), TraceBlocks(model.adapter) as tr:
        clean = model.hf(**ch.cb.model_inputs(), use_cache=False).logits[r, last]
    with torch.no_grad():
        corrupt = model.hf(**ch.xb.model_inputs(), use_cache=False).logits[r, last]
    for i, layer in enumerate(layers):
        for j, pos in enumerate(POSITIONS):
            m = ch.masks[pos][..., None]

            def edit(_l, h, _m=m, _v=tr.values[layer]):
                return torch.where(_m, _v, h)

            with torch.no_grad(), TraceBlocks(model.adapter, [layer], edit=edit):
                logits = model.hf(**ch.xb.model_inputs(), use_cache=False).logits[r, last]
            out[i, j] = ch.ld(logits)
    return _result(out, ch.ld(clean), ch.ld(corrupt))


def nnsight_loop(peer, ch: Chunk, layers: list[int]) -> dict[str, np.ndarray]:
    """nnsight: clean run saved in one trace, then one trace of the corrupt batch per cell."""
    nn_model, blocks = peer
    out = np.zeros((len(layers), len(POSITIONS), len(ch.last)))
    r, last = ch.rows, ch.last
    with torch.no_grad(), nn_model.trace(**ch.cb.model_inputs(), use_cache=False):
        # nnsight 0.8 defers the body: collect into a saved list, not a comprehension
        resid = list().save()
        resid.append(blocks[0].input)
        for blk in blocks:
            resid.append(blk.output)
        clean = nn_model.output.logits[r, last].save()
    with torch.no_grad(), nn_model.trace(**ch.xb.model_inputs(), use_cache=False):
        corrupt = nn_model.output.logits[r, last].save()
    for i, layer in enumerate(layers):
        for j, pos in enumerate(POSITIONS):
            m = ch.masks[pos][..., None]
            v = resid[layer]
            with torch.no_grad(), nn_model.trace(**ch.xb.model_inputs(), use_cache=False):
                if layer == 0:
                    h = blocks[0].input
                    blocks[0].input = torch.where(m, v, h)
                else:
                    h = blocks[layer - 1].output
                    blocks[layer - 1].output = torch.where(m, v, h)
                logits = nn_model.output.logits[r, last].save()
            out[i, j] = ch.ld(logits)
    return _result(out, ch.ld(clean), ch.ld(corrupt))


def _tl_hook(layer: int) -> str:
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def tl_loop(bridge, ch: Chunk, layers: list[int]) -> dict[str, np.ndarray]:
    """TransformerLens: ``run_with_cache`` on clean, ``run_with_hooks`` on corrupt per cell.

    Prompts are right-padded and the model is causal, so real tokens never see the padding.
    """
    out = np.zeros((len(layers), len(POSITIONS), len(ch.last)))
    r, last = ch.rows, ch.last
    names = {_tl_hook(layer) for layer in layers}
    x_ids = ch.xb.input_ids
    with torch.no_grad():
        clean, cache = bridge.run_with_cache(ch.cb.input_ids, names_filter=lambda n: n in names)
        corrupt = bridge(x_ids)
        for i, layer in enumerate(layers):
            name = _tl_hook(layer)
            for j, pos in enumerate(POSITIONS):
                m = ch.masks[pos][..., None]

                def hook(act, hook, _m=m, _v=cache[name]):
                    return torch.where(_m, _v, act)

                logits = bridge.run_with_hooks(x_ids, fwd_hooks=[(name, hook)])
                out[i, j] = ch.ld(logits[r, last])
    return _result(out, ch.ld(clean[r, last]), ch.ld(corrupt[r, last]))


def medmap_patch(model, ch: Chunk, layers: list[int]) -> dict[str, np.ndarray]:
    df = patch(model, positions=POSITIONS, layers=layers, batch_size=len(ch.last), **ch.data)
    out = np.zeros((len(layers), len(POSITIONS), len(ch.last)))
    for j, pos in enumerate(POSITIONS):
        sel = df[df["position"] == pos]
        out[:, j, :] = (
            sel.pivot(index="layer", columns="pair", values="logit_diff_patched")
            .loc[layers]
            .to_numpy()
        )
    first = df[(df["layer"] == layers[0]) & (df["position"] == POSITIONS[0])]
    return _result(
        out, first["logit_diff_clean"].to_numpy(), first["logit_diff_corrupt"].to_numpy()
    )


def restored(res: dict[str, np.ndarray]) -> np.ndarray:
    return (res["patched"] - res["corrupt"]) / (res["clean"] - res["corrupt"])


def compare(name: str, res: dict, ref: dict, tol: float, min_gap: float, where: str) -> dict:
    """Max |logit-diff| and |restored| disagreement with medmap; raises above ``tol``."""
    ld = max(float(np.abs(res[k] - ref[k]).max()) for k in ("patched", "clean", "corrupt"))
    ok = np.abs(ref["clean"] - ref["corrupt"]) >= min_gap  # restored is ill-conditioned below
    rest = float(np.abs(restored(res) - restored(ref))[..., ok].max()) if ok.any() else float("nan")
    print(
        f"check {name:16s} vs medmap ({where}): max |logit-diff diff| {ld:.2e}, "
        f"max |restored diff| {rest:.2e} ({int(ok.sum())}/{ok.size} pairs with |LD gap| >= {min_gap})"
    )
    if not (ld <= tol and (rest != rest or rest <= tol)):
        raise SystemExit(f"{name} does not compute the same numbers as medmap ({where})")
    return {"logit_diff": ld, "restored": rest}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument(
        "--min-gap",
        type=float,
        default=0.5,
        help="restored compared where |LD_clean-LD_corrupt| >= this",
    )
    ap.add_argument(
        "--peers",
        default="naive,nnsight,transformer-lens",
        help="comma list of methods to compare with medmap (medmap always runs)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - {"naive", "nnsight", "transformer-lens"}
    if unknown:
        raise SystemExit(f"unknown peers {sorted(unknown)}")
    load_start = os.getloadavg()
    model = medmap.load_model(args.model)
    n = model.n_layers
    all_layers = list(range(n + 1))
    data = pairs(model.tokenizer, args.pairs)
    bs = args.batch_size
    chunks = [
        Chunk(model, {k: v[s : s + bs] for k, v in data.items()}) for s in range(0, args.pairs, bs)
    ]

    methods = {"medmap": lambda ch, layers: medmap_patch(model, ch, layers)}
    if "naive" in peers:
        methods["naive"] = lambda ch, layers: naive(model, ch, layers)
    versions = {"torch": torch.__version__}
    if "nnsight" in peers and (peer := nnsight_model(model)) is not None:
        methods["nnsight"] = lambda ch, layers: nnsight_loop(peer, ch, layers)
        versions["nnsight"] = nnsight_version()
    tl_status = "not requested (--peers)"
    if "transformer-lens" in peers:
        bridge, why = tl_bridge(model)
        if bridge is None:
            tl_status = f"unavailable: {why}"
        else:
            methods["transformer-lens"] = lambda ch, layers: tl_loop(bridge, ch, layers)
            versions["transformer-lens"] = tl_version()
            tl_status = "TransformerBridge (own eager-style attention)"
    print(f"transformer-lens: {tl_status}")

    # correctness first (also the warm-up): first batch, a few layers, all positions
    few = sorted({0, 1, n // 2, n})
    checks = {}
    ref = methods["medmap"](chunks[0], few)
    # not vacuous: patching every position at layer 0, or the last position after the last
    # block, must restore the clean run exactly
    gap = np.abs(ref["clean"] - ref["corrupt"]) >= args.min_gap
    rest = restored(ref)
    for li, pos in ((0, "all"), (-1, "last")):
        got = rest[li, POSITIONS.index(pos)][gap]
        assert np.allclose(got, 1.0, atol=1e-4), f"medmap restored at ({few[li]}, {pos}): {got}"
    print(
        "medmap restored, first batch, mean over pairs (rows: layers "
        f"{few}; cols: {POSITIONS}):\n{np.nanmean(np.where(gap, rest, np.nan), axis=-1).round(3)}"
    )
    for name, fn in methods.items():
        if name != "medmap":
            checks[name] = compare(
                name,
                fn(chunks[0], few),
                ref,
                args.tol,
                args.min_gap,
                f"pairs 0-{bs - 1}, layers {few}",
            )

    per_chunk: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, list[dict]] = {name: [] for name in methods}
    order = rotations(list(methods))
    for ch in chunks:
        for name in next(order):
            t, res = clock(lambda name=name, ch=ch: methods[name](ch, all_layers))
            per_chunk[name].append(t)
            results[name].append(res)
    times = {name: sum(v) for name, v in per_chunk.items()}
    full = {
        name: {k: np.concatenate([r[k] for r in rs], axis=-1) for k in rs[0]}
        for name, rs in results.items()
    }
    full_checks = {
        name: compare(name, full[name], full["medmap"], args.tol, args.min_gap, "all cells")
        for name in methods
        if name != "medmap"
    }

    cells = (n + 1) * len(POSITIONS)
    load = {"start": load_start, "end": os.getloadavg()}
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {load['end']}")
    print(
        f"model={args.model} residual layers={n + 1} positions={len(POSITIONS)} "
        f"pairs={args.pairs} batch={bs} cells={cells} threads={torch.get_num_threads()} "
        + " ".join(f"{k}={v}" for k, v in versions.items())
    )
    labels = {
        "naive": "naive per-cell hook loop",
        "nnsight": "nnsight per-cell trace loop",
        "transformer-lens": "TransformerLens per-cell hook loop",
        "medmap": "medmap.techniques.patch",
    }
    for name in methods:
        print(f"{labels[name]:34s}: {times[name]:8.2f} s")
    ratios = {}
    for name in methods:
        if name != "medmap":
            ratios[name] = times["medmap"] / times[name]
            per = sorted(m / p for m, p in zip(per_chunk["medmap"], per_chunk[name]))
            print(
                f"ratio medmap / {name:16s}: {ratios[name]:.3f}x "
                f"(per batch of pairs: min {per[0]:.3f}, median {np.median(per):.3f}, "
                f"max {per[-1]:.3f})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "versions": versions,
                    "transformer_lens": tl_status,
                    "seconds": times,
                    "seconds_per_batch": per_chunk,
                    "loadavg": load,
                    "ratios": ratios,
                    "checks_first_batch": checks,
                    "checks_all_cells": full_checks,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
