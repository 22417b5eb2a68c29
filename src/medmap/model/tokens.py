"""Prompts → padded token batches, and which token positions a request refers to.

A *position request* is ``"last"`` (the last real token), ``"mean"`` (all real tokens), or a
character span ``(start, end)`` in the prompt (e.g. the concept's words; the tokens overlapping
the span are averaged). Requests become a weight matrix ``W`` of shape ``(batch, seq)`` whose
rows sum to 1, so the reduced activation is ``einsum("bs,bsd->bd", W, hidden)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medmap.errors import MedmapError

Span = tuple[int, int]
Position = str | Span | Sequence[Span]


@dataclass
class Batch:
    """A padded batch. ``input_ids``/``attention_mask``/``position_ids``: ``(batch, seq)``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    offsets: list[list[tuple[int, int]]]  # per prompt, per token (unpadded order): char offsets
    lengths: list[int]  # real tokens per prompt
    padding_side: str

    def model_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model(**inputs)``; explicit ``position_ids`` make padding exact."""
        d = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }
        return {k: v.to(device) for k, v in d.items()} if device is not None else d

    def token_index(self, i: int, t: int) -> int:
        """Column in the padded batch of real token ``t`` of prompt ``i``."""
        pad = self.input_ids.shape[1] - self.lengths[i]
        return t + pad if self.padding_side == "left" else t


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def encode(
    tokenizer,
    prompts: Sequence[str],
    *,
    padding_side: str = "right",
    max_length: int | None = None,
) -> Batch:
    """Tokenise ``prompts`` (with the tokenizer's special tokens, e.g. BOS) and pad.

    Raises :class:`MedmapError` for an empty prompt list, an empty prompt, or a prompt longer
    than ``max_length`` tokens (the model's context).
    """
    if len(prompts) == 0:
        raise MedmapError("no prompts given", hint="pass at least one prompt")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    ids_list, offsets = [], []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise MedmapError(f"prompt {i} is empty", hint="every prompt needs some text")
        enc = tokenizer(p, return_offsets_mapping=True, add_special_tokens=True)
        ids = list(enc["input_ids"])
        if max_length is not None and len(ids) > max_length:
            raise MedmapError(
                f"prompt {i} has {len(ids)} tokens, longer than the model context of {max_length}",
                hint="shorten the prompt or use a model with a longer context",
            )
        ids_list.append(ids)
        offsets.append([tuple(o) for o in enc["offset_mapping"]])
    lengths = [len(x) for x in ids_list]
    seq = max(lengths)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(prompts), seq), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), seq), dtype=torch.long)
    for i, ids in enumerate(ids_list):
        sl = slice(seq - len(ids), seq) if padding_side == "left" else slice(0, len(ids))
        input_ids[i, sl] = torch.tensor(ids, dtype=torch.long)
        mask[i, sl] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(input_ids, mask, position_ids, offsets, lengths, padding_side)


def span_tokens(offsets: Sequence[tuple[int, int]], span: Span) -> list[int]:
    """Indices of the tokens whose character range overlaps ``span`` (special tokens excluded)."""
    s, e = span
    return [t for t, (a, b) in enumerate(offsets) if b > a and a < e and b > s]


def position_weights(batch: Batch, position: Position) -> torch.Tensor:
    """Weights ``(batch, seq)`` selecting the requested positions; each row sums to 1."""
    n, seq = batch.input_ids.shape
    w = torch.zeros((n, seq), dtype=torch.float32)
    if isinstance(position, str):
        if position == "last":
            for i in range(n):
                w[i, batch.token_index(i, batch.lengths[i] - 1)] = 1.0
        elif position == "mean":
            w = batch.attention_mask.float() / batch.attention_mask.sum(-1, keepdim=True)
        else:
            raise MedmapError(
                f"unknown position {position!r}",
                hint="use 'last', 'mean', or character spans (start, end)",
            )
        return w
    spans = [position] * n if _is_span(position) else list(position)
    if len(spans) != n:
        raise MedmapError(f"{len(spans)} spans given for {n} prompts")
    for i, span in enumerate(spans):
        toks = span_tokens(batch.offsets[i], tuple(span))
        if not toks:
            raise MedmapError(f"span {tuple(span)} of prompt {i} covers no token")
        for t in toks:
            w[i, batch.token_index(i, t)] = 1.0 / len(toks)
    return w


def _is_span(x) -> bool:
    return isinstance(x, tuple | list) and len(x) == 2 and all(isinstance(v, int) for v in x)
