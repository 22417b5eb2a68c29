"""Counterfactual prompt pairs for activation patching.

A pair is two items of one set that share a target id (so their prompts come from the same
template and differ only in the concept span) and whose accepted answers are disjoint (so the
answer changes with the concept). With a tokenizer, a pair is kept only if the two prompts have
the same number of tokens, the tokens outside the concept span are identical, and the two
answers start with different tokens (a logit difference needs two different answer tokens).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from medmap.concepts.schema import ConceptSet, RenderedTarget


@dataclass(frozen=True)
class Pair:
    """``clean`` and ``corrupt`` prompts of one target id and the answer each one expects."""

    clean: RenderedTarget
    corrupt: RenderedTarget
    clean_answer: str
    corrupt_answer: str


def _norm(answers) -> set[str]:
    return {a.strip().casefold() for a in answers}


def candidate_pairs(cs: ConceptSet, seed: int = 0) -> list[Pair]:
    """Every ordered pair with disjoint answers, shuffled deterministically and interleaved over
    target ids (so a capped list covers every target id)."""
    by_target: dict[str, list[RenderedTarget]] = defaultdict(list)
    for t in cs.targets():
        by_target[t.target_id].append(t)
    rng = random.Random(seed)
    queues = []
    for tid in sorted(by_target):
        ts = by_target[tid]
        pairs = [
            Pair(a, b, a.answers[0], b.answers[0])
            for a in ts
            for b in ts
            if a.item_index != b.item_index and not (_norm(a.answers) & _norm(b.answers))
        ]
        rng.shuffle(pairs)
        queues.append(pairs)
    out: list[Pair] = []
    for k in range(max((len(q) for q in queues), default=0)):
        out += [q[k] for q in queues if k < len(q)]
    return out


class _TokenCheck:
    """Caches tokenisations; decides whether a pair differs only in the concept tokens."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.cache: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}

    def encode(self, text: str):
        if text not in self.cache:
            enc = self.tok(text, add_special_tokens=True, return_offsets_mapping=True)
            self.cache[text] = (list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])
        return self.cache[text]

    def first_token(self, prompt: str, answer: str) -> int | None:
        # the same token the patching metric uses (one definition, medmap.model.targets)
        from medmap.model.targets import first_target_token

        return first_target_token(self.tok, prompt, answer, encode=self.encode)

    def ok(self, p: Pair) -> bool:
        ids_a, off_a = self.encode(p.clean.prompt)
        ids_b, off_b = self.encode(p.corrupt.prompt)
        if len(ids_a) != len(ids_b):
            return False
        for ia, ib, (sa, ea), (sb, eb) in zip(ids_a, ids_b, off_a, off_b):
            in_a = ea > sa and ea > p.clean.span[0] and sa < p.clean.span[1]
            in_b = eb > sb and eb > p.corrupt.span[0] and sb < p.corrupt.span[1]
            if ia != ib and not (in_a and in_b):
                return False
        fa = self.first_token(p.clean.prompt, p.clean_answer)
        fb = self.first_token(p.corrupt.prompt, p.corrupt_answer)
        return fa is not None and fb is not None and fa != fb


def counterfactual_pairs(
    cs: ConceptSet,
    tokenizer=None,
    *,
    max_pairs: int | None = None,
    seed: int = 0,
    target_ids: list[str] | None = None,
) -> Iterator[Pair]:
    """Counterfactual pairs of ``cs`` (see module docstring), at most ``max_pairs``.

    Args:
        cs: a concept set.
        tokenizer: a Hugging Face tokenizer; if given, keep only pairs whose prompts tokenize to
            the same length and differ only at the concept's tokens.
        max_pairs: stop after this many pairs (``None``: all).
        seed: order of the pairs (deterministic).
        target_ids: restrict to these target ids.
    """
    check = _TokenCheck(tokenizer) if tokenizer is not None else None
    n = 0
    for p in candidate_pairs(cs, seed):
        if max_pairs is not None and n >= max_pairs:
            return
        if target_ids is not None and p.clean.target_id not in target_ids:
            continue
        if check is not None and not check.ok(p):
            continue
        n += 1
        yield p


def pair_survival(cs: ConceptSet, tokenizer, seed: int = 0) -> dict[str, int]:
    """How many candidate pairs exist and how many survive ``tokenizer``'s checks."""
    cands = candidate_pairs(cs, seed)
    check = _TokenCheck(tokenizer)
    return {"candidates": len(cands), "same_length": sum(check.ok(p) for p in cands)}
