"""Does the model know the fact? Log-probability and rank of each item's target answers.

The paper's maps only make sense for facts the model knows, so ``knows`` scores, for every
rendered target of a set, each accepted answer appended to the prompt and keeps the best one.
``known`` = the best answer's first token is within the model's top ``k`` next-token predictions.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from medmap.activations import iter_batches
from medmap.causal.targets import encode_targets, prediction_index, target_scores
from medmap.concepts.loader import load_concepts
from medmap.progress import progress_bar


def _logits_at(model, inputs: dict, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits only at ``(rows, cols)``: the base model's (final-normed) last hidden state, then
    the unembedding there (the full ``(batch, seq, vocab)`` logits are never built)."""
    base = getattr(model.hf, model.hf.base_model_prefix, None) or model.hf
    h = base(**inputs, use_cache=False).last_hidden_state
    sel = h[rows.to(h.device), cols.to(h.device)]
    ad = model.adapter
    logits = ad.unembed(sel.to(ad.unembed.weight.device))
    if ad.logit_softcap:
        logits = torch.tanh(logits / ad.logit_softcap) * ad.logit_softcap
    return logits


def score_answers(
    model,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    advance=None,
) -> pd.DataFrame:
    """Per (prompt, answer): ``logprob`` (nats, summed over answer tokens), ``n_tokens`` and the
    ``rank`` of the answer's first token (0 = the model's top prediction)."""
    out = []
    for sl in iter_batches(len(prompts), batch_size):
        batch, spans = encode_targets(
            model.tokenizer, prompts[sl], answers[sl], max_length=model.max_length
        )
        rows, cols, _, _ = prediction_index(spans)
        with torch.inference_mode():
            logits = _logits_at(model, batch.model_inputs(model.input_device), rows, cols)
        s = target_scores(logits, spans, k=1)
        rank = s["rank"]
        for i, sp in enumerate(spans):
            out.append(
                {
                    "logprob": -float(s["nll"][i]),
                    "n_tokens": sp.stop - sp.start,
                    "rank": int(rank[i]),
                }
            )
        if advance is not None:
            advance(1)
    return pd.DataFrame(out)


def knows(
    model,
    concepts,
    *,
    k: int = 10,
    max_items: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> pd.DataFrame:
    """For each item × target: the best accepted answer's log-probability and first-token rank.

    Args:
        model: a :class:`medmap.MedmapModel`.
        concepts: a concept set or its name/path.
        k: an item counts as ``known`` when its best answer's first token has rank < ``k``.
        max_items: score only the first ``max_items`` items.

    Returns:
        One row per (item, target): ``model, concept_set, item_id, target_id, prompt,
        best_answer, logprob, logprob_per_token, rank, known``.
    """
    cs = load_concepts(concepts)
    targets = list(cs.targets())
    if max_items is not None:
        keep = {t.item_index for t in targets if t.item_index < max_items}
        targets = [t for t in targets if t.item_index in keep]
    flat = [(ti, a) for ti, t in enumerate(targets) for a in t.answers]
    n_batches = -(-len(flat) // batch_size)
    with progress_bar(f"knows {cs.name}", total=n_batches, enabled=progress) as advance:
        scores = score_answers(
            model,
            [targets[ti].prompt for ti, _ in flat],
            [a for _, a in flat],
            batch_size=batch_size,
            advance=advance,
        )
    scores["target"] = [ti for ti, _ in flat]
    scores["answer"] = [a for _, a in flat]
    scores["per_token"] = scores["logprob"] / scores["n_tokens"]
    best = scores.sort_values(["target", "rank", "logprob"], ascending=[True, True, False])
    best = best.groupby("target", sort=True).head(1).set_index("target")
    rows = []
    for ti, t in enumerate(targets):
        b = best.loc[ti]
        rows.append(
            {
                "model": model.name,
                "concept_set": cs.name,
                "item_id": t.item_id,
                "target_id": t.target_id,
                "prompt": t.prompt,
                "best_answer": b["answer"],
                "logprob": float(b["logprob"]),
                "logprob_per_token": float(b["per_token"]),
                "rank": int(b["rank"]),
                "known": bool(b["rank"] < k),
            }
        )
    return pd.DataFrame(rows)


def known_fraction(df: pd.DataFrame) -> pd.DataFrame:
    """Fraction of known targets per (model, concept set) from :func:`knows` output."""
    return (
        df.groupby(["model", "concept_set"], sort=True)["known"]
        .agg(known="mean", n="size")
        .reset_index()
    )
