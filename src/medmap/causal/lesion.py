"""Layer lesioning: remove one block (or a window of consecutive blocks) and measure the damage.

A lesioned block passes its input through unchanged, which equals deleting it from the block
list. Per item the target completion's NLL (nats, summed over its tokens) and the top-1 / top-k
hit of its first token are measured with and without the lesion.

Efficient sweep: the intact forward pass is run once per chunk of items while recording every
block's input and call arguments (:mod:`medmap.causal.prefix`); lesioning blocks ``b..b+w-1``
then restarts from block ``b``'s recorded input at block ``b+w``, so the unchanged prefix is never
recomputed, and logits are computed only at the positions that predict target tokens.

Layer numbering: ``layer`` = first lesioned block index + 1 (the first residual index that
changes), so ``layer`` runs over ``1..n_layers - window + 1``; ``block`` is the 0-based index.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd
import torch

from medmap.activations import iter_batches
from medmap.causal.cells import CellCache, cell_key, model_identity
from medmap.causal.concept_io import concept_targets, set_name
from medmap.causal.prefix import record, run_blocks
from medmap.causal.summary import mean_ci, relative_depth, specificity_row
from medmap.causal.sweep import sweep_cells
from medmap.causal.targets import encode_targets, prediction_index, target_scores
from medmap.errors import MedmapError
from medmap.results import make_rows

METRICS = ("delta_nll", "delta_top1", "delta_topk")


def lesion_layers(layers: Sequence[int] | None, n_layers: int, window: int) -> list[int]:
    """Validate lesion layer numbers (``1..n_layers - window + 1``); ``None`` = all."""
    if window < 1 or window > n_layers:
        raise MedmapError(f"lesion window {window} is invalid", hint=f"use 1..{n_layers}")
    top = n_layers - window + 1
    if layers is None:
        return list(range(1, top + 1))
    out = [int(x) for x in layers]
    bad = [x for x in out if not 1 <= x <= top]
    if bad:
        raise MedmapError(
            f"lesion layer {bad[0]} is out of range",
            hint=f"with window {window} this model has lesion layers 1..{top} (layer l removes block l-1)",
        )
    return out


def lesion(
    model,
    prompts: Sequence[str],
    targets: Sequence[str],
    layers: Sequence[int] | None = None,
    window: int = 1,
    *,
    k: int = 5,
    batch_size: int = 8,
    concept_set: str = "custom",
    item_ids: Sequence[str] | None = None,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Per-item effect of removing blocks on each item's target completion.

    Args:
        model: a :class:`medmap.MedmapModel`.
        prompts / targets: item ``i`` scores ``targets[i]`` appended to ``prompts[i]``.
        layers: lesion layer numbers ``l`` (removes blocks ``l-1 .. l-2+window``); ``None`` = all.
        window: number of consecutive blocks removed together.
        k: top-k accuracy of the target's first token.
        batch_size: items per forward pass and per resumable cell (halved automatically when
            a batch runs out of memory, see :mod:`medmap.causal.sweep`).
        concept_set: name written to the ``concept_set`` column (and into cell keys).
        item_ids: labels for the ``item_id`` column (default: the item index).
        cache_dir: directory of finished cells (one Parquet per layer × chunk); a rerun with the
            same arguments skips them.

    Returns:
        One row per (layer, item): ``model, concept_set, n_layers, layer, block, window, item,
        item_id, nll_base, nll_lesioned, delta_nll, top1_base, top1_lesioned, delta_top1,
        topk_base, topk_lesioned, delta_topk``. NLL in nats; deltas are lesioned − base.
    """
    if len(prompts) == 0:
        raise MedmapError("no prompts given", hint="pass at least one prompt")
    n = model.n_layers
    layer_list = lesion_layers(layers, n, window)
    ids = [str(i) for i in range(len(prompts))] if item_ids is None else [str(x) for x in item_ids]
    if len(ids) != len(prompts):
        raise MedmapError(f"{len(ids)} item ids for {len(prompts)} prompts")
    cache = CellCache(cache_dir, "lesion")
    ident = model_identity(model)
    # validate every item before any work (no partial output on bad input)
    for sl in iter_batches(len(prompts), batch_size):
        encode_targets(model.tokenizer, prompts[sl], targets[sl], max_length=model.max_length)

    def key_of(sl: slice, layer: int) -> str:
        return cell_key(
            technique="lesion",
            model=ident,
            concept_set=concept_set,
            layer=layer,
            window=window,
            k=k,
            prompts=list(prompts[sl]),
            targets=list(targets[sl]),
            ids=ids[sl],
        )

    def compute(sl: slice, todo: list[int], emit) -> None:
        _lesion_chunk(
            model, prompts[sl], targets[sl], todo, window, k, sl.start, ids[sl], concept_set, emit
        )

    frames = sweep_cells(
        len(prompts), batch_size, layer_list, key_of, compute, cache,
        description="lesion", progress=progress,
    )  # fmt: skip
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["layer", "item"], kind="stable").reset_index(drop=True)


def _lesion_chunk(
    model, prompts, targets, layers, window, k, first_item, ids, concept_set, emit
) -> None:
    """Rows of every lesion layer in ``layers`` for one batch of items; ``emit(layer, df)`` each."""
    n = model.n_layers
    batch, spans = encode_targets(model.tokenizer, prompts, targets, max_length=model.max_length)
    rec = record(model, batch.model_inputs(model.input_device))
    rows, cols, _, _ = prediction_index(spans)

    def scores(final: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            sel = final[rows.to(final.device), cols.to(final.device)]
            return target_scores(model.adapter.head(sel), spans, k=k)

    base = scores(rec.inputs[n])
    for layer in layers:
        b = layer - 1
        h = rec.inputs[b]
        if b + window < n:
            h = run_blocks(model, rec, h, b + window)
        les = scores(h)
        df = pd.DataFrame(
            {
                "model": model.name,
                "concept_set": concept_set,
                "n_layers": n,
                "layer": layer,
                "block": b,
                "window": window,
                "item": range(first_item, first_item + len(prompts)),
                "item_id": list(ids),
                "nll_base": base["nll"].numpy(),
                "nll_lesioned": les["nll"].numpy(),
                "delta_nll": (les["nll"] - base["nll"]).numpy(),
                "top1_base": base["top1"].numpy(),
                "top1_lesioned": les["top1"].numpy(),
                "delta_top1": (les["top1"] - base["top1"]).numpy(),
                "topk_base": base["topk"].numpy(),
                "topk_lesioned": les["topk"].numpy(),
                "delta_topk": (les["topk"] - base["topk"]).numpy(),
            }
        )
        emit(layer, df)


_BASE_OF = {"delta_nll": "nll_base", "delta_top1": "top1_base", "delta_topk": "topk_base"}


def lesion_summary(df: pd.DataFrame, *, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Tidy rows from :func:`lesion` output: mean change per (set, layer, window) with a CI.

    Metrics ``delta_nll``, ``delta_top1``, ``delta_topk``; ``baseline`` is the intact model's mean
    (NLL, top-1 or top-k accuracy); extra column ``window``.
    """
    rows = []
    for (model, cset, n_layers, layer, window), g in df.groupby(
        ["model", "concept_set", "n_layers", "layer", "window"], sort=True
    ):
        for metric in METRICS:
            est, lo, hi, cnt = mean_ci(g[metric].to_numpy(), n_boot=n_boot, seed=seed)
            rows.append(
                {
                    "model": model,
                    "layer": int(layer),
                    "relative_depth": relative_depth(int(layer), int(n_layers)),
                    "concept_set": cset,
                    "technique": "lesion",
                    "metric": metric,
                    "value": est,
                    "ci_low": lo,
                    "ci_high": hi,
                    "baseline": float(g[_BASE_OF[metric]].mean()),
                    "n": cnt,
                    "seed": seed,
                    "window": int(window),
                }
            )
    return make_rows(rows)


def lesion_specificity(
    medical: pd.DataFrame,
    control: pd.DataFrame,
    *,
    metric: str = "delta_nll",
    kind: str = "difference",
    n_boot: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """Medical damage relative to control damage per layer (tidy rows).

    ``kind="difference"``: mean medical ``metric`` − mean control ``metric``; ``"ratio"``: their
    quotient. Metric name ``specificity_<metric>``, label = ``kind``, concept_set
    ``<medical>-vs-<control>``; two-sample bootstrap CI.
    """
    rows = []
    for (layer, window), g in medical.groupby(["layer", "window"], sort=True):
        c = control[(control["layer"] == layer) & (control["window"] == window)]
        if c.empty:
            continue
        rows.append(
            specificity_row(
                g, c, layer=layer, technique="lesion", metric=metric, kind=kind,
                n_boot=n_boot, seed=seed, window=int(window),
            )
        )  # fmt: skip
    return make_rows(rows)


def lesion_concepts(
    model,
    cs,
    *,
    layers: Sequence[int] | None = None,
    window: int = 1,
    k: int = 5,
    max_items: int | None = None,
    batch_size: int = 8,
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """:func:`lesion` over a concept set's targets (first accepted answer), as tidy rows."""
    ct = concept_targets(cs, max_items)
    df = lesion(
        model,
        ct.prompts,
        ct.targets,
        layers,
        window,
        k=k,
        batch_size=batch_size,
        concept_set=set_name(cs),
        item_ids=ct.ids,
        progress=progress,
        cache_dir=cache_dir,
    )
    return lesion_summary(df, n_boot=n_boot, seed=seed)
