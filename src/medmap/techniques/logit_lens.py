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

**Tuned lens (linear shortcut).** The logit lens reads early layers through a head trained on
the last layer's basis, which biases emergence late. The tuned variant first maps the residual
at index ``l`` to the last block's output with one affine translator per layer,
``h_n ≈ [h_l, 1] A_l``, fitted by ridge least squares on the bundled neutral text (every token
but each sentence's first, whose attention-sink norms would dominate the fit;
:func:`fit_tuned_lens`), then decodes through the same head. This is the closed-form
"linear shortcut" of Din et al. (2023, arXiv 2303.09435); Belrose et al.'s tuned lens
(arXiv 2303.08112) trains the same affine maps on a KL objective. At the last index the
translator is the identity. The same rows are written with ``lens = "tuned"`` beside
``lens = "logit"``; the answer-emergence map reads the logit lens.

Cost: one forward pass per (prompt, candidate) plus, per layer, the head on the answer positions
only (no full-vocabulary logits at other positions); the tuned lens adds one pass over the
neutral text per run (its translators are cached in the run directory).
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
    translators: torch.Tensor | None = None,
) -> list[np.ndarray] | dict[str, list[np.ndarray]]:
    """Whole-answer log-probabilities through the logit lens (and the tuned lens).

    Args:
        model: a :class:`medmap.MedmapModel`.
        prompts: ``n`` prompts.
        answers: per prompt, its candidate completions (appended to the prompt as is).
        layers: residual indices ``0..n_layers`` (default all).
        batch_size: (prompt + candidate) sequences per forward pass.
        translators: ``(n_layers, d_model + 1, d_model)`` from :func:`fit_tuned_lens`: also
            score through the tuned lens, in the same forward passes.

    Returns:
        Per prompt, an array ``(n_layers_kept, n_candidates)`` of summed log-probabilities
        (nats) of each candidate's answer tokens decoded from each layer; with
        ``translators`` a dict ``{"logit": ..., "tuned": ...}`` of two such lists.
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
    lenses = ("logit",) if translators is None else ("logit", "tuned")
    outs = {k: [np.zeros((len(layer_ids), len(c))) for c in answers] for k in lenses}
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
            per_seq = None
            for lens in lenses:
                if layer < n or per_seq is None:  # the last index is the same under both lenses
                    with torch.inference_mode():
                        if layer < n:
                            h = tr[sites[layer]]
                            h = h[rows.to(h.device), cols.to(h.device)]  # (positions, d_model)
                            if lens == "tuned":
                                a = translators[layer].to(h.device, torch.float32)
                                h = (h.float() @ a[:-1] + a[-1]).to(h.dtype)
                            logits = adapter.logits(h)
                        else:  # the model's own output (= the head on the last block's output)
                            dev = res.logits.device
                            logits = res.logits[rows.to(dev), cols.to(dev)]
                        lp = torch.log_softmax(logits.float(), -1)
                        tok_lp = lp.gather(1, target.to(lp.device)[:, None])[:, 0]
                    got = tok_lp.double().cpu().numpy()
                    per_seq = np.bincount(owner, weights=got, minlength=len(chunk))
                for r, c in enumerate(chunk):
                    outs[lens][c[0]][li, c[1]] = per_seq[r]
    return outs["logit"] if translators is None else outs


TUNED_RIDGE = 1e-3  # ridge on the translators, relative to the mean input variance


def fit_tuned_lens(
    model: MedmapModel,
    sentences: Sequence[str] | None = None,
    *,
    ridge: float = TUNED_RIDGE,
    batch_size: int = 16,
) -> torch.Tensor:
    """Affine translators of the tuned lens (linear shortcut), one per residual index.

    Args:
        model: a :class:`medmap.MedmapModel`.
        sentences: fitting text (default: every bundled neutral sentence,
            :func:`medmap.techniques.lesioning.neutral_sentences`); every token but the first
            of each sentence is one sample.
        ridge: Tikhonov weight, times the samples' mean square input feature (the bias is not
            penalised).

    Returns:
        float32 ``(n_layers, d_model + 1, d_model)``: ``A[l]`` maps ``[h_l, 1]`` (the residual at
        index ``l``: 0 = embedding output, ``l`` = after ``l`` blocks) to the last block's
        output, ``h_n ≈ h_l @ A[l][:-1] + A[l][-1]``, by least squares.
    """
    from medmap.model.tokens import encode
    from medmap.techniques.lesioning import neutral_sentences

    texts = list(neutral_sentences() if sentences is None else sentences)
    if not texts:
        raise MedmapError("no text to fit the tuned lens on", hint="pass sentences")
    n, d = model.n_layers, model.d_model
    sites = ["resid_pre.0"] + [f"resid_post.{b}" for b in range(n)]
    xtx = torch.zeros(n, d + 1, d + 1, dtype=torch.float64)
    xty = torch.zeros(n, d + 1, d, dtype=torch.float64)
    for s0 in range(0, len(texts), batch_size):
        batch = encode(model.tokenizer, texts[s0 : s0 + batch_size], max_length=model.max_length)
        inputs = batch.model_inputs(model.input_device)
        keep = inputs["attention_mask"].bool().clone()
        first = keep.int().argmax(1)  # each sentence's first real token (either padding side)
        keep[torch.arange(len(keep)), first] = False
        with torch.inference_mode(), Trace(model.adapter, sites) as tr:
            model.adapter.base(**inputs, use_cache=False)
        m = keep.to(tr[sites[-1]].device)
        y = tr[sites[-1]][m].double().cpu()
        for layer in range(n):
            x = tr[sites[layer]][m].double().cpu()
            x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            xtx[layer] += x1.T @ x1
            xty[layer] += x1.T @ y
    out = torch.empty(n, d + 1, d, dtype=torch.float32)
    for layer in range(n):
        a = xtx[layer].clone()  # diagonal: samples × mean square of each input feature
        a[range(d), range(d)] += ridge * max(float(torch.diagonal(a)[:d].mean()), 1e-12)
        out[layer] = torch.linalg.solve(a, xty[layer]).float()
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
    translators: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Answer emergence of a concept set's targets through the logit lens (module doc).

    Args:
        model: a :class:`medmap.MedmapModel`.
        concepts: a ConceptSet or a bundled set's name (its items' ``targets:`` are scored).
        layers: residual indices (default ``0..n_layers``).
        max_items: stratified subset of the items; ``max_targets``: first targets per item.
        max_distractors: cap of the forced choice's distractors (as in ``knows``).
        translators: from :func:`fit_tuned_lens`: the same rows through the tuned lens too.

    Returns:
        Tidy rows (:mod:`medmap.analysis.results`): ``lens_accuracy`` and ``lens_margin`` per
        layer, ``emergence_layer`` and ``emergence_depth`` at ``layer = -1``; column ``lens``
        (``"logit"``, and ``"tuned"`` with ``translators``).
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
        model, prompts, [c.candidates for c in choices], layers=layer_ids, batch_size=batch_size,
        translators=translators,
    )  # fmt: skip
    by_lens = {"logit": scores} if translators is None else scores
    base = {"model": model.name, "concept_set": cs.name, "technique": "logit_lens", "seed": seed}
    rows = []
    for lens, sc in by_lens.items():
        rows += _lens_rows(sc, choices, layer_ids, n, base | {"lens": lens}, n_boot, seed)
    return make_rows(rows)


def _lens_rows(scores, choices, layer_ids, n, base, n_boot, seed) -> list[dict]:
    """The rows of one lens from its per-prompt scores (see :func:`logit_lens`)."""
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
    return rows


class LogitLensTechnique(Technique):
    """The logit and tuned lenses as a runner technique (``parts/logit_lens/<set>.parquet``),
    registered in :mod:`medmap.techniques.base`; the forced choice of the knows stage
    (``knows_distractors``). The tuned lens's translators are fitted once
    per run on the bundled neutral text and cached in ``cells/logit_lens/tuned_lens/``. Its
    rows feed the answer-emergence map (:func:`medmap.analysis.maps.emergence_rows`, the logit
    lens), not the combined map."""

    name = "logit_lens"
    title = "logit lenses"
    map_rows = ()
    needs_targets = True
    min_items = 2

    def run_cell(self, model: MedmapModel, cell, ctx) -> pd.DataFrame:
        cs = ctx.trim_targets(ctx.load_set(cell.concept_set, self))
        cfg = ctx.config
        path = ctx.run.cells_dir(self.name, "tuned_lens") / "translators.safetensors"
        return logit_lens(
            model, cs, max_distractors=cfg.knows_distractors, n_boot=cfg.n_boot, seed=cfg.seed,
            batch_size=max(1, cfg.batch_size),
            translators=cached_tuned_lens(model, path, batch_size=max(1, cfg.batch_size)),
        )  # fmt: skip


def cached_tuned_lens(model: MedmapModel, path, *, batch_size: int = 16) -> torch.Tensor:
    """:func:`fit_tuned_lens` on the neutral text, read from ``path`` (safetensors) when a
    previous cell of the run wrote it, else fitted and written atomically."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from medmap.run.outputs import write_atomic

    path = Path(path)
    if path.exists():
        return load_file(str(path))["translators"]
    a = fit_tuned_lens(model, batch_size=batch_size)
    write_atomic(path, lambda tmp: save_file({"translators": a.contiguous()}, tmp))
    return a
