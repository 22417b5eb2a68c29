"""Layer lesioning: remove one block (or a window of consecutive blocks) and measure the damage.

A lesioned block passes its input through unchanged, which equals deleting it from the block
list. Per item the target completion's NLL (nats, summed over its tokens) and the top-1 / top-k
hit of its first token are measured with and without the lesion.

Efficient sweep: the intact forward pass is run once per chunk of items while recording every
block's input and call arguments (:mod:`medmap.model.replay`); lesioning blocks ``b..b+w-1``
then restarts from block ``b``'s recorded input at block ``b+w``, so the unchanged prefix is never
recomputed, and logits are computed only at the positions that predict target tokens.

Layer numbering: ``layer`` = first lesioned block index + 1 (the first residual index that
changes), so ``layer`` runs over ``1..n_layers - window + 1``; ``block`` is the 0-based index.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd
import torch

from medmap.analysis.results import make_rows
from medmap.errors import MedmapError
from medmap.model.replay import record, run_blocks
from medmap.model.sites import Trace, ablation_sites, submodule_kind
from medmap.model.targets import encode_targets, prediction_index, target_scores
from medmap.run.cells import CellCache, cell_key, model_identity
from medmap.techniques.base import Cell, RunContext, Technique
from medmap.techniques.capture import iter_batches
from medmap.techniques.concept_io import concept_targets, plain_or_concepts, set_name
from medmap.techniques.summary import mean_ci, relative_depth, specificity_row, split_half_rows
from medmap.techniques.sweep import sweep_cells

if TYPE_CHECKING:  # pragma: no cover
    from medmap.model.loading import MedmapModel

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
    model: MedmapModel,
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
    site: str = "block",
) -> pd.DataFrame:
    """Per-item effect of removing blocks on each item's target completion.

    Args:
        model: a :class:`medmap.MedmapModel`.
        prompts / targets: item ``i`` scores ``targets[i]`` appended to ``prompts[i]``.
        layers: lesion layer numbers ``l`` (removes blocks ``l-1 .. l-2+window``); ``None`` = all.
        window: number of consecutive blocks removed together.
        k: top-k accuracy of the target's first token.
        batch_size: items per forward pass and per resumable cell (halved automatically when
            a batch runs out of memory, see :mod:`medmap.techniques.sweep`).
        concept_set: name written to the ``concept_set`` column (and into cell keys).
        item_ids: labels for the ``item_id`` column (default: the item index).
        cache_dir: directory of finished cells (one Parquet per layer × chunk); a rerun with the
            same arguments skips them.
        site: what is removed in each lesioned block: ``"block"`` (the block passes its input
            through, = deleting it), ``"attn"`` or ``"mlp"`` (that sub-module's output is zeroed,
            sites ``attn_out`` / ``mlp_out`` of :mod:`medmap.model.sites`; for a
            mixture-of-experts block ``"mlp"`` zeroes the whole mixture).

    Returns:
        One row per (layer, item): ``model, concept_set, n_layers, layer, block, window, site,
        item, item_id, nll_base, nll_lesioned, delta_nll, top1_base, top1_lesioned, delta_top1,
        topk_base, topk_lesioned, delta_topk``. NLL in nats; deltas are lesioned − base.
    """
    if len(prompts) == 0:
        raise MedmapError("no prompts given", hint="pass at least one prompt")
    n = model.n_layers
    submodule_kind(site)  # validates
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
            **({} if site == "block" else {"site": site}),  # block keys as before (resumable)
        )

    def compute(sl: slice, todo: list[int], emit) -> None:
        _lesion_chunk(
            model, prompts[sl], targets[sl], todo, window, k, sl.start, ids[sl], concept_set,
            emit, site,
        )  # fmt: skip

    frames = sweep_cells(
        len(prompts), batch_size, layer_list, key_of, compute, cache,
        description="lesion", progress=progress,
    )  # fmt: skip
    out = pd.concat(frames, ignore_index=True)
    out["site"] = out["site"].fillna(site) if "site" in out else site  # cells cached before sites
    return out.sort_values(["layer", "item"], kind="stable").reset_index(drop=True)


def _lesion_chunk(
    model, prompts, targets, layers, window, k, first_item, ids, concept_set, emit, site="block"
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
        if site != "block":  # blocks b.. run with the sub-module's output zeroed in the window
            with Trace(model.adapter, ablate=ablation_sites(site, range(b, b + window))):
                h = run_blocks(model, rec, h, b)
        elif b + window < n:
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
                "site": site,
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


def _summary_rows(
    df: pd.DataFrame, base_of: dict[str, str | None], *, n_boot: int, seed: int
) -> pd.DataFrame:
    """Per (set, site, layer, window) the mean of each metric in ``base_of`` that ``df`` has,
    with its bootstrap CI; ``baseline`` is the mean of the column ``base_of[metric]`` (NaN for
    ``None``). Shared by :func:`lesion_summary` and :func:`lesion_knowledge_summary`."""
    rows = []
    df = df.assign(site=df["site"].fillna("block")) if "site" in df else df.assign(site="block")
    metrics = [m for m in base_of if m in df.columns]
    for (model, cset, n_layers, site, layer, window), g in df.groupby(
        ["model", "concept_set", "n_layers", "site", "layer", "window"], sort=True
    ):
        for metric in metrics:
            est, lo, hi, cnt = mean_ci(g[metric].to_numpy(), n_boot=n_boot, seed=seed)
            base = base_of[metric]
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
                    "baseline": float(g[base].mean()) if base else float("nan"),
                    "n": cnt,
                    "seed": seed,
                    "window": int(window),
                    "site": site,
                }
            )
    return make_rows(rows)


def lesion_summary(df: pd.DataFrame, *, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Tidy rows from :func:`lesion` output: mean change per (set, site, layer, window) with a CI.

    Metrics ``delta_nll``, ``delta_top1``, ``delta_topk``; ``baseline`` is the intact model's mean
    (NLL, top-1 or top-k accuracy); extra columns ``window`` and ``site`` (``block``, ``attn``,
    ``mlp``).
    """
    return _summary_rows(df, _BASE_OF, n_boot=n_boot, seed=seed)


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
    if "site" in medical.columns and "site" in control.columns:  # one site at a time
        sites = sorted(set(medical["site"].dropna()) & set(control["site"].dropna()))
        if len(sites) > 1:
            parts = [
                lesion_specificity(
                    medical[medical["site"] == s], control[control["site"] == s], metric=metric,
                    kind=kind, n_boot=n_boot, seed=seed,
                ).assign(site=s)
                for s in sites
            ]  # fmt: skip
            return make_rows(pd.concat(parts, ignore_index=True).to_dict("records"))
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
    model: MedmapModel,
    cs=None,
    *,
    prompts: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    item_ids: Sequence[str] | None = None,
    concept_set: str | None = None,
    layers: Sequence[int] | None = None,
    window: int = 1,
    k: int = 5,
    max_items: int | None = None,
    batch_size: int = 8,
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
    site: str = "block",
) -> pd.DataFrame:
    """:func:`lesion` over a concept set's targets or over plain strings, as tidy rows.

    Args:
        cs: a concept set (a :class:`~medmap.concepts.ConceptSet`, a bundled name such as
            ``"drugs"``, or a ``.yaml``/``.csv`` path): every target, scored with its first
            accepted answer; ``max_items`` takes a stratified, seeded subset
            (``ConceptSet.subset``).
        prompts / targets: instead of ``cs``, the plain strings :func:`lesion` takes (item ``i``
            scores ``targets[i]`` after ``prompts[i]``); ``max_items`` keeps the first items;
            ``item_ids`` label them (default: the index).
        concept_set: the ``concept_set`` column (default: the set's name, or ``"custom"``).
        layers, window, k, batch_size, cache_dir, site: as in :func:`lesion` (``site``:
            ``"block"``, ``"attn"`` or ``"mlp"``).
        n_boot / seed: bootstrap resamples and seed of the CIs (and of the subset).

    Returns:
        :func:`lesion_summary` rows (the :mod:`medmap.analysis.results` columns plus
        ``window`` and ``site``), the same shape for a concept set and for plain strings: the
        same prompts and answers give the same rows whichever way they come.
    """
    ct, name = plain_or_concepts(
        cs, prompts=prompts, targets=targets, item_ids=item_ids, concept_set=concept_set,
        max_items=max_items, seed=seed, technique="lesion",
    )  # fmt: skip
    df = lesion(
        model,
        ct.prompts,
        ct.targets,
        layers,
        window,
        k=k,
        batch_size=batch_size,
        concept_set=name,
        item_ids=ct.ids,
        progress=progress,
        cache_dir=cache_dir,
        site=site,
    )
    return lesion_summary(df, n_boot=n_boot, seed=seed)


class LesionTechnique(Technique):
    """Layer lesioning through the technique interface (:mod:`medmap.techniques.base`).

    In a run every target is lesioned with its forced-choice candidates (the knows stage's best
    accepted answer against the same distractors, :meth:`RunContext.choices`), so each cell has
    ΔNLL, top-1/top-k of the scored answer, Δmargin, Δcorrect and, with generic damage on the
    bundled neutral text (``generic_sentences``), the fact-specific damage
    (:func:`lesion_margins`). A set whose targets have no distractor gets ΔNLL only. With
    ``known_only`` only known targets are lesioned (:meth:`RunContext.causal_set`).
    """

    name = "lesion"
    title = "lesions"
    map_rows = ("lesion",)

    def run_cell(self, model: MedmapModel, cell: Cell, ctx: RunContext) -> pd.DataFrame:
        from medmap.analysis.results import COLUMNS
        from medmap.techniques.knowledge import Choice

        cfg = ctx.config
        cs = ctx.causal_set(cell.concept_set, self)
        if cs is None:  # too few known facts: the knows rows say so
            return pd.DataFrame(columns=COLUMNS)
        targets = list(cs.targets())
        choices = ctx.choices(cell.concept_set)
        scored = [choices.get(f"{t.item_id}/{t.target_id}") for t in targets]
        if not any(c is not None and c.distractors for c in scored):
            return self._nll_only(model, cs, cell, ctx)
        # the scored answer against the distractors: margin base = the knows stage's margin
        picked = [
            Choice(c.accepted[:1], c.distractors) if c is not None else Choice((), ())
            for c in scored
        ]
        frames = []
        for site in cfg.lesion_sites:
            generic = generic_damage(
                model, None, cfg.lesion_window, max_sentences=cfg.generic_sentences,
                batch_size=cfg.batch_size, site=site, progress=ctx.progress,
                cache_dir=ctx.run.cells_dir(self.name, "neutral"),
            )  # fmt: skip
            frames.append(
                lesion_margins(
                    model,
                    targets,
                    None,
                    cfg.lesion_window,
                    choices=picked,
                    k=cfg.lesion_k,
                    batch_size=cfg.batch_size,
                    concept_set=set_name(cs),
                    generic=generic,
                    site=site,
                    progress=ctx.progress,
                    cache_dir=ctx.run.cells_dir(self.name, cell.key),
                )  # fmt: skip
            )
        items = pd.concat(frames, ignore_index=True)
        ctx.keep_items(self.name, cell, items)
        stab = split_half_rows(
            items, value="specific_damage", map_name="lesion", by=("site",), seed=cfg.seed
        )
        return pd.concat(
            [
                lesion_summary(items, n_boot=cfg.n_boot, seed=cfg.seed),
                lesion_knowledge_summary(items, n_boot=cfg.n_boot, seed=cfg.seed),
                make_rows(stab),
            ],
            ignore_index=True,
        )

    def _nll_only(self, model: MedmapModel, cs, cell: Cell, ctx: RunContext) -> pd.DataFrame:
        cfg = ctx.config
        ct = concept_targets(cs)
        frames = [
            lesion(
                model,
                ct.prompts,
                ct.targets,
                None,
                cfg.lesion_window,
                k=cfg.lesion_k,
                batch_size=cfg.batch_size,
                concept_set=set_name(cs),
                item_ids=ct.ids,
                progress=ctx.progress,
                cache_dir=ctx.run.cells_dir(self.name, cell.key),
                site=site,
            )  # fmt: skip
            for site in cfg.lesion_sites
        ]
        items = pd.concat(frames, ignore_index=True)
        ctx.keep_items(self.name, cell, items)
        stab = split_half_rows(
            items, value="delta_nll", map_name="lesion", by=("site",), seed=cfg.seed
        )
        return pd.concat(
            [lesion_summary(items, n_boot=cfg.n_boot, seed=cfg.seed), make_rows(stab)],
            ignore_index=True,
        )


# --------------------------------------------------------------------------- knowledge, not fluency
# Added for issue 15: the margin of forced choice under a lesion, and generic damage on neutral
# text, so a lesion's effect on a fact can be told apart from its effect on fluency.

KNOWLEDGE_METRICS = ("delta_margin", "delta_correct", "specific_damage")


def neutral_sentences(max_sentences: int | None = None) -> list[str]:
    """The bundled neutral (non-medical, public-domain) sentences, in file order.

    Source: ``medmap/concepts/data/neutral.txt`` (its header names the texts)."""
    from importlib.resources import files

    text = (files("medmap.concepts") / "data" / "neutral.txt").read_text(encoding="utf-8")
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.startswith("#")]
    return lines if max_sentences is None else lines[:max_sentences]


def _split_first_word(sentence: str) -> tuple[str, str]:
    head, _, rest = sentence.partition(" ")
    return head, " " + rest


def generic_damage(
    model: MedmapModel,
    layers: Sequence[int] | None = None,
    window: int = 1,
    *,
    sentences: Sequence[str] | None = None,
    max_sentences: int | None = None,
    batch_size: int = 8,
    site: str = "block",
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Per lesion layer, the change of the mean token NLL on neutral text (fluency damage).

    Each sentence's first word is the prompt and the rest is scored, with exactly the lesion of
    :func:`lesion` (same sites, same replay). ``nll_base`` / ``nll_lesioned`` are token means over
    all scored tokens (nats per token, pooled: Σ NLL / Σ tokens).

    Returns:
        One row per layer: ``model, n_layers, layer, block, window, site, n_sentences,
        n_tokens, nll_base, nll_lesioned, generic_delta_nll`` (= lesioned − base, nats/token).
    """
    sents = list(sentences) if sentences is not None else neutral_sentences(max_sentences)
    parts = [_split_first_word(s) for s in sents]
    prompts, targets = [p for p, _ in parts], [t for _, t in parts]
    _, spans = encode_targets(model.tokenizer, prompts, targets, max_length=model.max_length)
    n_tok = pd.Series([s.stop - s.start for s in spans], index=[str(i) for i in range(len(sents))])
    df = lesion(
        model, prompts, targets, layers, window, batch_size=batch_size, concept_set="neutral",
        progress=progress, cache_dir=cache_dir, site=site,
    )  # fmt: skip
    df["n_tokens"] = df["item_id"].map(n_tok)
    rows = []
    for (layer, block), g in df.groupby(["layer", "block"], sort=True):
        tokens = float(g["n_tokens"].sum())
        rows.append(
            {
                "model": model.name,
                "n_layers": model.n_layers,
                "layer": int(layer),
                "block": int(block),
                "window": window,
                "site": site,
                "n_sentences": len(g),
                "n_tokens": int(tokens),
                "nll_base": float(g["nll_base"].sum()) / tokens,
                "nll_lesioned": float(g["nll_lesioned"].sum()) / tokens,
                "generic_delta_nll": float(g["delta_nll"].sum()) / tokens,
            }
        )
    return pd.DataFrame(rows)


def _margin(nll: pd.Series, accepted: int) -> tuple[float, bool]:
    """Forced-choice margin (nats) of candidates ordered accepted-first, from their NLLs."""
    lp = -nll.to_numpy()
    m = float(lp[:accepted].max() - lp[accepted:].max())
    return m, m > 0


def lesion_margins(
    model: MedmapModel,
    targets: Sequence,
    layers: Sequence[int] | None = None,
    window: int = 1,
    *,
    choices: Sequence | None = None,
    max_distractors: int = 4,
    seed: int = 0,
    k: int = 5,
    batch_size: int = 8,
    concept_set: str = "custom",
    generic: pd.DataFrame | None = None,
    site: str = "block",
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Per item and lesion layer: the change of the forced-choice margin beside ΔNLL.

    Every candidate (accepted answers, then distractors: :func:`medmap.techniques.knowledge.
    forced_choices` over ``targets``, or the given ``choices``) is scored by :func:`lesion`; the
    margin is best accepted − best distractor whole-answer log-probability (nats), ``correct``
    = margin > 0 (the forced choice of ``knows``).

    ``specific_damage`` (when ``generic`` from :func:`generic_damage` is given, same layers,
    window and site) is the margin loss beyond what generic damage predicts:
    ``specific_damage[i, l] = −Δmargin[i, l] − β · generic_delta_nll[l]``, with ``β`` the
    least-squares slope through the origin of the item-mean ``−Δmargin[l]`` on
    ``generic_delta_nll[l]`` over the layers of this call (nats of margin per nat/token of
    neutral-text NLL). Positive = the lesion hurts this fact more than its fluency damage
    explains; it is a contrast across layers, so run it on the full layer sweep.

    Returns:
        One row per (layer, item): ``model, concept_set, n_layers, layer, block, window, site,
        item_id, n_candidates, nll_base, nll_lesioned, delta_nll``, ``top1_*`` / ``topk_*``
        (first accepted answer, as :func:`lesion`), ``margin_base, margin_lesioned, delta_margin, correct_base,
        correct_lesioned, delta_correct`` and, with ``generic``, ``generic_delta_nll, beta,
        specific_damage``.
    """
    from medmap.techniques.knowledge import forced_choices

    targets = list(targets)
    if choices is None:
        choices = forced_choices(targets, max_distractors=max_distractors, seed=seed)[0]
    keep = [i for i, c in enumerate(choices) if c.distractors]
    if not keep:
        raise MedmapError(
            "no target has a distractor, so there is no margin to lesion",
            hint="forced choice needs other items with the same target id or `distractors:`",
        )
    prompts, cands, ids = [], [], []
    for i in keep:
        t = targets[i]
        for q, a in enumerate(choices[i].candidates):
            prompts.append(t.prompt)
            cands.append(a)
            ids.append(f"{t.item_id}/{t.target_id}#{q}")
    df = lesion(
        model, prompts, cands, layers, window, k=k, batch_size=batch_size,
        concept_set=concept_set, item_ids=ids, progress=progress, cache_dir=cache_dir, site=site,
    )  # fmt: skip
    df["target"] = df["item_id"].str.rsplit("#", n=1).str[0]
    df["cand"] = df["item_id"].str.rsplit("#", n=1).str[1].astype(int)
    n_acc = {f"{targets[i].item_id}/{targets[i].target_id}": len(choices[i].accepted) for i in keep}
    rows = []
    for (layer, block, target), g in df.sort_values("cand").groupby(
        ["layer", "block", "target"], sort=True
    ):
        a = n_acc[target]
        mb, cb = _margin(g["nll_base"], a)
        ml, cl = _margin(g["nll_lesioned"], a)
        first = g.iloc[0]
        rows.append(
            {
                "model": model.name,
                "concept_set": concept_set,
                "n_layers": model.n_layers,
                "layer": int(layer),
                "block": int(block),
                "window": window,
                "site": site,
                "item_id": target,
                "n_candidates": len(g),
                "nll_base": float(first["nll_base"]),
                "nll_lesioned": float(first["nll_lesioned"]),
                "delta_nll": float(first["delta_nll"]),
                **{c: float(first[c]) for c in _TOPK_COLUMNS},
                "margin_base": mb,
                "margin_lesioned": ml,
                "delta_margin": ml - mb,
                "correct_base": float(cb),
                "correct_lesioned": float(cl),
                "delta_correct": float(cl) - float(cb),
            }
        )
    out = pd.DataFrame(rows)
    if generic is not None:
        out = add_specific_damage(out, generic)
    return out


_TOPK_COLUMNS = (
    "top1_base", "top1_lesioned", "delta_top1", "topk_base", "topk_lesioned", "delta_topk",
)  # fmt: skip


def add_specific_damage(margins: pd.DataFrame, generic: pd.DataFrame) -> pd.DataFrame:
    """Add ``generic_delta_nll``, ``beta`` and ``specific_damage`` (see :func:`lesion_margins`)
    to margin rows, per (concept set, site, window)."""
    g = generic[["layer", "window", "site", "generic_delta_nll"]]
    out = margins.merge(g, on=["layer", "window", "site"], how="left", validate="many_to_one")
    if out["generic_delta_nll"].isna().any():
        missing = sorted(out.loc[out["generic_delta_nll"].isna(), "layer"].unique())
        raise MedmapError(
            f"generic damage is missing for lesion layers {missing}",
            hint="run generic_damage with the same layers, window and site as the margins",
        )
    parts = []
    for _, part in out.groupby(["concept_set", "site", "window"], sort=False):
        per_layer = part.groupby("layer").agg(
            loss=("delta_margin", lambda v: -v.mean()), gen=("generic_delta_nll", "first")
        )
        den = float((per_layer["gen"] ** 2).sum())
        beta = float((per_layer["gen"] * per_layer["loss"]).sum()) / den if den > 0 else 0.0
        part = part.assign(beta=beta)
        part["specific_damage"] = -part["delta_margin"] - beta * part["generic_delta_nll"]
        parts.append(part)
    return pd.concat(parts).loc[out.index]


_KNOWLEDGE_BASE = {
    "delta_margin": "margin_base",
    "delta_correct": "correct_base",
    "specific_damage": None,
    "generic_delta_nll": None,
}


def lesion_knowledge_summary(df: pd.DataFrame, *, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Tidy rows from :func:`lesion_margins` output: per (set, site, layer, window) the mean
    ``delta_margin`` (baseline: intact mean margin), ``delta_correct`` (baseline: intact
    fraction correct) and, when present, ``specific_damage`` and ``generic_delta_nll`` (the
    neutral-text value, identical for every item; CI collapses to it)."""
    return _summary_rows(df, _KNOWLEDGE_BASE, n_boot=n_boot, seed=seed)
