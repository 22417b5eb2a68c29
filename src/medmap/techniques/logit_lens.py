"""Answer emergence (logit lens): at which depth does the right answer become the model's choice?

At every residual index ``l`` (0 = the embedding output as block 0 sees it, ``l`` = after
``l`` blocks, before the final norm; :mod:`medmap.model.sites`) the residual stream is decoded
through the model's own head, ``adapter.logits`` (final norm, unembedding, softcap), as if the
remaining blocks were skipped (nostalgebraist's logit lens). At the last index this is exactly
the model's output.

**Scoring: whole answers by teacher forcing through the lens.** Each candidate answer is
appended to the prompt and run once; at every layer its log-probability is the sum, over its
answer tokens, of the lens's log-softmax at the position that predicts the token. Candidates are
those of the forced choice of :mod:`medmap.techniques.knowledge` (the item's accepted answers
against the other items' disjoint answers and the target's own distractors). Whole answers
rather than first tokens: answers such as ``" the liver"`` or any number share their first
token (pitfalls #8), and a first token shared by every candidate measures nothing. With teacher
forcing, answer tokens shared by two candidates at the same place after the same prefix get
identical lens log-probabilities, so they cancel in the margin and only the distinguishing
tokens decide.

Rows (technique ``logit_lens``, one per layer unless said):

- ``lens_accuracy``: fraction of targets whose best accepted answer beats every distractor at
  that layer; ``baseline`` = mean chance (accepted / candidates); CI: bootstrap over targets.
- ``lens_margin``: mean over targets of best accepted − best distractor (nats).
- ``emergence_layer`` (``layer = -1``): over the targets the model gets right at the last layer,
  the median of the first layer from which the lens's choice is right at every later layer;
  ``relative_depth`` = that layer / ``n_layers``; CI: bootstrap over those targets.
  ``emergence_depth`` (``layer = -1``): the same divided by ``n_layers``.

Cost: one forward pass per (prompt, candidate) plus, per layer, the head on the answer positions
only (no full-vocabulary logits at other positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from medmap.errors import MedmapError
from medmap.model.sites import Trace
from medmap.model.targets import target_span
from medmap.model.tokens import _pad_id
from medmap.techniques.base import Technique

if TYPE_CHECKING:  # pragma: no cover
    from medmap.model.loading import MedmapModel


def lens_logprobs(
    model: MedmapModel,
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> list[np.ndarray]:
    """Whole-answer log-probabilities through the logit lens.

    Args:
        model: a :class:`medmap.MedmapModel`.
        prompts: ``n`` prompts.
        answers: per prompt, its candidate completions (appended to the prompt as is).
        layers: residual indices ``0..n_layers`` (default all).
        batch_size: (prompt + candidate) sequences per forward pass.

    Returns:
        Per prompt, an array ``(n_layers_kept, n_candidates)`` of summed log-probabilities
        (nats) of each candidate's answer tokens decoded from each layer.
    """
    if len(prompts) != len(answers):
        raise MedmapError(f"{len(prompts)} prompts but {len(answers)} candidate lists")
    n = model.n_layers
    layer_ids = list(range(n + 1)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layer_ids if not 0 <= x <= n]
    if bad:
        raise MedmapError(f"layer {bad[0]} is out of range", hint=f"use residual indices 0..{n}")
    tok = model.tokenizer
    seqs: list[tuple[int, int, list[int], int, int]] = []  # (prompt, cand, ids, start, stop)
    for i, (p, cands) in enumerate(zip(prompts, answers)):
        for j, a in enumerate(cands):
            enc = tok(p + a, return_offsets_mapping=True, add_special_tokens=True)
            ids = [int(x) for x in enc["input_ids"]]
            span = target_span([tuple(o) for o in enc["offset_mapping"]], ids, len(p))
            seqs.append((i, j, ids, span.start, span.stop))
    out = [np.zeros((len(layer_ids), len(c))) for c in answers]
    sites = ["resid_pre.0"] + [f"resid_post.{b}" for b in range(n)]
    adapter = model.adapter
    pad = _pad_id(tok)
    for s0 in range(0, len(seqs), batch_size):
        chunk = seqs[s0 : s0 + batch_size]
        t = max(len(c[2]) for c in chunk)
        ids = torch.full((len(chunk), t), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        for r, c in enumerate(chunk):  # right padding: real tokens keep positions 0..len-1
            ids[r, : len(c[2])] = torch.tensor(c[2])
            mask[r, : len(c[2])] = 1
        rows = torch.tensor([r for r, c in enumerate(chunk) for _ in range(c[3], c[4])])
        cols = torch.tensor([k - 1 for c in chunk for k in range(c[3], c[4])])
        target = torch.tensor([c[2][k] for c in chunk for k in range(c[3], c[4])])
        owner = np.array([r for r, c in enumerate(chunk) for _ in range(c[3], c[4])])
        with torch.inference_mode(), Trace(adapter, [sites[x] for x in layer_ids if x < n]) as tr:
            res = model.hf(
                input_ids=ids.to(model.input_device),
                attention_mask=mask.to(model.input_device),
            )
        for li, layer in enumerate(layer_ids):
            with torch.inference_mode():
                if layer < n:
                    h = tr[sites[layer]]
                    logits = adapter.logits(h, (rows.to(h.device), cols.to(h.device)))
                else:  # the model's own output (equal to the head on the last block's output)
                    logits = res.logits[rows.to(res.logits.device), cols.to(res.logits.device)]
                lp = torch.log_softmax(logits.float(), -1)
                got = lp.gather(1, target.to(lp.device)[:, None])[:, 0].double().cpu().numpy()
            per_seq = np.bincount(owner, weights=got, minlength=len(chunk))
            for r, c in enumerate(chunk):
                out[c[0]][li, c[1]] = per_seq[r]
    return out


def _targets(concepts, max_items: int | None, max_targets: int | None, seed: int):
    if isinstance(concepts, str):
        from medmap.concepts import load_concepts

        concepts = load_concepts(concepts)
    if max_items is not None and len(concepts.items) > max_items:
        concepts = concepts.subset(max_items, seed=seed)
    targets = list(concepts.targets())
    if max_targets is not None:
        keep: dict[int, int] = {}
        kept = []
        for t in targets:
            if keep.get(t.item_index, 0) < max_targets:
                keep[t.item_index] = keep.get(t.item_index, 0) + 1
                kept.append(t)
        targets = kept
    return concepts, targets


def emergence_layers(correct: np.ndarray, layers: Sequence[int]) -> np.ndarray:
    """Per target (columns of ``correct`` ``(n_layers_kept, n_targets)`` bools), the first layer
    from which the choice is right at every later kept layer; NaN when wrong at the last."""
    layers = np.asarray(layers, dtype=float)
    out = np.full(correct.shape[1], np.nan)
    for j in range(correct.shape[1]):
        col = correct[:, j]
        if not col[-1]:
            continue
        wrong = np.flatnonzero(~col)
        out[j] = layers[wrong[-1] + 1] if len(wrong) else layers[0]
    return out


def logit_lens(
    model: MedmapModel,
    concepts,
    *,
    layers: Sequence[int] | None = None,
    max_items: int | None = None,
    max_targets: int | None = None,
    max_distractors: int = 15,
    n_boot: int = 200,
    seed: int = 0,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Answer emergence of a concept set's targets through the logit lens (module doc).

    Args:
        model: a :class:`medmap.MedmapModel`.
        concepts: a ConceptSet or a bundled set's name (its items' ``targets:`` are scored).
        layers: residual indices (default ``0..n_layers``).
        max_items: stratified subset of the items; ``max_targets``: first targets per item.
        max_distractors: cap of the forced choice's distractors (as in ``knows``).

    Returns:
        Tidy rows (:mod:`medmap.analysis.results`): ``lens_accuracy`` and ``lens_margin`` per
        layer, ``emergence_layer`` and ``emergence_depth`` at ``layer = -1``.
    """
    from medmap.analysis.results import make_rows
    from medmap.techniques.knowledge import forced_choices

    cs, targets = _targets(concepts, max_items, max_targets, seed)
    if not targets:
        raise MedmapError(f"concept set {cs.name!r} has no targets", hint="add targets: to items")
    real, _, _ = forced_choices(targets, max_distractors=max_distractors, seed=seed)
    keep = [i for i, c in enumerate(real) if c is not None and c.distractors]
    if not keep:
        raise MedmapError(
            f"no target of {cs.name!r} has a distractor",
            hint="a forced choice needs other items with disjoint answers",
        )
    choices = [real[i] for i in keep]
    prompts = [targets[i].prompt for i in keep]
    n = model.n_layers
    layer_ids = list(range(n + 1)) if layers is None else [int(x) for x in layers]
    scores = lens_logprobs(
        model, prompts, [c.candidates for c in choices], layers=layer_ids, batch_size=batch_size
    )
    n_t = len(choices)
    margin = np.zeros((len(layer_ids), n_t))
    for j, (c, s) in enumerate(zip(choices, scores)):
        k = len(c.accepted)
        margin[:, j] = s[:, :k].max(1) - s[:, k:].max(1)
    correct = margin > 0
    chance = float(np.mean([len(c.accepted) / len(c.candidates) for c in choices]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_t, size=(n_boot, n_t))

    def ci(x: np.ndarray) -> tuple[float, float]:
        b = x[idx].mean(1)
        return float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))

    base = {"model": model.name, "concept_set": cs.name, "technique": "logit_lens", "seed": seed}
    rows = []
    for li, layer in enumerate(layer_ids):
        depth = layer / n if n else np.nan
        for metric, x, bl in (
            ("lens_accuracy", correct[li].astype(float), chance),
            ("lens_margin", margin[li], np.nan),
        ):
            lo, hi = ci(x)
            rows.append(base | dict(layer=layer, relative_depth=depth, metric=metric,
                                    value=float(x.mean()), ci_low=lo, ci_high=hi, baseline=bl,
                                    n=n_t))  # fmt: skip
    em = emergence_layers(correct, layer_ids)
    ok = em[np.isfinite(em)]
    if len(ok):
        b = np.median(ok[rng.integers(0, len(ok), size=(n_boot, len(ok)))], axis=1)
        lo, hi = float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))
        med = float(np.median(ok))
    else:
        med = lo = hi = float("nan")
    for metric, scale in (("emergence_layer", 1.0), ("emergence_depth", 1.0 / max(n, 1))):
        rows.append(base | dict(layer=-1, relative_depth=med / max(n, 1), metric=metric,
                                value=med * scale, ci_low=lo * scale, ci_high=hi * scale,
                                n=int(len(ok))))  # fmt: skip
    return make_rows(rows)


class LogitLensTechnique(Technique):
    """The logit lens as a runner technique (``parts/logit_lens/<set>.parquet``), registered in
    :mod:`medmap.techniques.base`; it feeds no knowledge-map row yet (``techniques`` in the run
    config opts in)."""

    name = "logit_lens"
    title = "logit lenses"
    map_rows = ()
    needs_targets = True
    min_items = 2

    def run_cell(self, model: MedmapModel, cell, ctx) -> pd.DataFrame:
        cs = ctx.trim_targets(ctx.load_set(cell.concept_set, self))
        cfg = ctx.config
        return logit_lens(
            model, cs, n_boot=cfg.n_boot, seed=cfg.seed, batch_size=max(1, cfg.batch_size)
        )
