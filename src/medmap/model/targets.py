"""Prompt + target completion → token ids, and the target's log-likelihood from logits.

A target is a string appended to its prompt (``" type 2 diabetes"``). The sequence fed to the
model is the tokenisation of ``prompt + target``; the *target tokens* are the tokens of that
sequence whose character range ends after the prompt (found from the tokenizer's offsets, so a
token that merges across the prompt/target boundary counts as a target token and the context is
the tokens before it). Token ``t`` is predicted by the logits at position ``t - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medmap.errors import MedmapError
from medmap.model.tokens import Batch, encode


@dataclass(frozen=True)
class TargetSpan:
    """Where an item's target sits in its tokenised ``prompt + target``.

    ``start``: index of the first target token (= context length); ``stop``: one past the last.
    ``ids``: all token ids of the unpadded sequence.
    """

    start: int
    stop: int
    ids: tuple[int, ...]

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.ids[self.start : self.stop]


def target_span(
    offsets: Sequence[tuple[int, int]], ids: Sequence[int], prompt_chars: int
) -> TargetSpan:
    """Locate the target tokens of one tokenised ``prompt + target`` (see module docstring)."""
    idx = [t for t, (a, b) in enumerate(offsets) if b > a and b > prompt_chars]
    if not idx:
        raise MedmapError("the target adds no token to its prompt", hint="use a non-empty target")
    start, stop = idx[0], idx[-1] + 1
    if start == 0:
        raise MedmapError(
            "the target starts at the first token, so nothing predicts it",
            hint="use a longer prompt or a tokenizer that adds a BOS token",
        )
    return TargetSpan(start, stop, tuple(int(i) for i in ids))


def first_target_token(tokenizer, prompt: str, target: str, *, encode=None) -> int | None:
    """Id of the token a model must predict right after ``prompt`` (tokenised alone, as patching
    and pair filtering run it) to start ``target``; ``None`` if ``target`` adds no token.

    The one definition of "the answer's first token" in medmap. From the tokenisation of
    ``prompt + target``: the first target token (:func:`target_span`) if the tokens before it
    are exactly the prompt's own tokens; if a token merges across the prompt/target boundary
    (the context is then not the prompt's tokens), the first token of ``target`` tokenised alone.
    ``encode(text) -> (ids, offsets)`` (with special tokens) may be passed to reuse a cache.
    """
    if encode is None:

        def encode(text):
            enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
            return list(enc["input_ids"]), list(enc["offset_mapping"])

    ids, offsets = encode(prompt + target)
    start = next((t for t, (a, b) in enumerate(offsets) if b > a and b > len(prompt)), None)
    if start is None:
        return None
    prompt_ids, _ = encode(prompt)
    if list(ids[:start]) == list(prompt_ids):
        return int(ids[start])
    alone = tokenizer(target, add_special_tokens=False)["input_ids"]
    return int(alone[0]) if alone else None


def encode_targets(
    tokenizer, prompts: Sequence[str], targets: Sequence[str], *, max_length: int | None = None
) -> tuple[Batch, list[TargetSpan]]:
    """Right-padded batch of ``prompt + target`` sequences and each item's :class:`TargetSpan`."""
    if len(prompts) != len(targets):
        raise MedmapError(f"{len(prompts)} prompts but {len(targets)} targets")
    for i, t in enumerate(targets):
        if not isinstance(t, str) or not t:
            raise MedmapError(f"target {i} is empty", hint="every item needs a target completion")
    full = [p + t for p, t in zip(prompts, targets)]
    batch = encode(tokenizer, full, padding_side="right", max_length=max_length)
    spans = []
    for i, p in enumerate(prompts):
        ids = batch.input_ids[i, : batch.lengths[i]].tolist()
        spans.append(target_span(batch.offsets[i], ids, len(p)))
    return batch, spans


def prediction_index(
    spans: Sequence[TargetSpan],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened (row, column) positions whose logits predict target tokens, and those tokens.

    Returns ``rows, cols, tokens, item_of`` (1-D long tensors of equal length): ``logits[rows,
    cols]`` predicts ``tokens``; ``item_of`` is the item each entry belongs to (= ``rows``). With
    right padding the column is the token index itself.
    """
    rows, cols, toks = [], [], []
    for i, s in enumerate(spans):
        for t in range(s.start, s.stop):
            rows.append(i)
            cols.append(t - 1)
            toks.append(s.ids[t])
    r = torch.tensor(rows, dtype=torch.long)
    return r, torch.tensor(cols, dtype=torch.long), torch.tensor(toks, dtype=torch.long), r


def target_scores(
    logits: torch.Tensor, spans: Sequence[TargetSpan], *, k: int = 5
) -> dict[str, torch.Tensor]:
    """Per-item NLL (nats, summed over target tokens), top-1/top-k hit and rank of the first target
    token (rank = vocabulary entries scoring strictly higher; 0 = top prediction).

    ``logits``: ``(n_positions, vocab)`` at the positions from :func:`prediction_index`, in order.
    Returns float64 tensors ``nll``, ``top1``, ``topk`` and the long tensor ``rank``, each of
    shape ``(n_items,)``.
    """
    rows, _, toks, _ = prediction_index(spans)
    logits = logits.float().cpu()
    logp = torch.log_softmax(logits, dim=-1)
    tok_nll = -logp.gather(1, toks[:, None])[:, 0].double()
    n = len(spans)
    nll = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, tok_nll)
    first = torch.tensor([0] + [s.stop - s.start for s in spans[:-1]]).cumsum(0)
    first_logits = logits[first]
    first_tok = toks[first]
    target_logit = first_logits.gather(1, first_tok[:, None])
    # rank = number of vocabulary entries scoring strictly higher than the target token
    rank = (first_logits > target_logit).sum(-1)
    return {
        "nll": nll,
        "top1": (rank < 1).double(),
        "topk": (rank < k).double(),
        "rank": rank,
    }


def answer_logprobs(
    model, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 16
) -> torch.Tensor:
    """Whole-answer log-probability (nats, summed over the answer's tokens) of ``answers[i]``
    after ``prompts[i]``, differentiable (runs under the caller's grad mode).

    Right-padded batches of ``prompt + answer`` (:func:`encode_targets`); the base model's
    final-normed hidden states are decoded only at the positions that predict answer tokens
    (:meth:`medmap.model.adapter.LayerAdapter.logits`), never over the whole sequence.

    Returns:
        float32 tensor ``(len(prompts),)`` on the device of the unembedding.
    """
    ad = model.adapter
    out = []
    for s in range(0, len(prompts), batch_size):
        p, a = list(prompts[s : s + batch_size]), list(answers[s : s + batch_size])
        batch, spans = encode_targets(model.tokenizer, p, a, max_length=model.max_length)
        hidden = ad.base(**batch.model_inputs(model.input_device), use_cache=False)
        rows, cols, toks, item_of = prediction_index(spans)
        h = hidden.last_hidden_state
        logits = ad.logits(h, (rows.to(h.device), cols.to(h.device)), normed=True).float()
        dev = logits.device
        lp = torch.log_softmax(logits, -1).gather(1, toks.to(dev)[:, None])[:, 0]
        out.append(torch.zeros(len(p), device=dev).index_add(0, item_of.to(dev), lp))
    return torch.cat(out)
