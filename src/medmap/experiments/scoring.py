"""Shared pieces of the experiments: differentiable answer log-probabilities, forced-choice
margins, block parameter handles, in-memory weight snapshots and deterministic execution.

Measurement uses :func:`medmap.techniques.knowledge.score_candidates` (whole-answer summed
log-probabilities, the forced-choice convention of the knowledge measurement); training needs
gradients, so :func:`medmap.model.targets.answer_logprobs` computes the same quantity with
autograd from a right-padded forward pass (tested equal).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from medmap.errors import MedmapError
from medmap.model.targets import answer_logprobs, encode_targets


def choice_margins(
    model, prompts: Sequence[str], answers: Sequence[str], pools: Sequence[Sequence[str]]
) -> np.ndarray:
    """Forced-choice margin (nats) per prompt: log p(answer) − max log p(distractor).

    ``pools[i]``: the distractors of prompt ``i``. Positive = the answer wins (the fact is known).
    """
    from medmap.techniques.knowledge import score_candidates

    cands = [[a, *pool] for a, pool in zip(answers, pools)]
    frames = score_candidates(model, prompts, cands)
    return np.array([f["logprob"].iloc[0] - f["logprob"].iloc[1:].max() for f in frames])


def soft_margins(
    model, prompts: Sequence[str], answers: Sequence[str], pools: Sequence[Sequence[str]]
) -> torch.Tensor:
    """Differentiable margin: log p(answer) − logsumexp over the distractors' log p (nats)."""
    flat_p, flat_a = [], []
    for p, a, pool in zip(prompts, answers, pools):
        for c in (a, *pool):
            flat_p.append(p)
            flat_a.append(c)
    lp = answer_logprobs(model, flat_p, flat_a)
    out, k = [], 0  # per prompt: its answer's segment, then its distractors'
    for pool in pools:
        n = 1 + len(pool)
        seg = lp[k : k + n]
        out.append(seg[0] - torch.logsumexp(seg[1:], 0))
        k += n
    return torch.stack(out)


def neutral_nll(model, lines: Sequence[str], *, batch_size: int = 8) -> float:
    """Mean per-token NLL (nats) of ``lines`` (each scored after its first word)."""
    prompts, targets = [], []
    for line in lines:
        head, _, tail = line.partition(" ")
        if tail:
            prompts.append(head)
            targets.append(" " + tail)
    if not prompts:
        raise MedmapError("no neutral text to score", hint="pass sentences of two words or more")
    with torch.no_grad():
        lp = answer_logprobs(model, prompts, targets, batch_size=batch_size)
    n_tok = [
        s.stop - s.start
        for s in encode_targets(model.tokenizer, prompts, targets, max_length=model.max_length)[1]
    ]
    return float(-lp.sum() / sum(n_tok))


def mlp_params(model, blocks: Sequence[int], part: str = "mlp") -> list[torch.nn.Parameter]:
    """Parameters of the MLP (``part="mlp"``) or the whole block (``"block"``) of ``blocks``."""
    n = model.n_layers
    bad = [b for b in blocks if not 0 <= b < n]
    if bad:
        raise MedmapError(
            f"block {bad[0]} is out of range", hint=f"this model has blocks 0..{n - 1}"
        )
    if part not in ("mlp", "block"):
        raise MedmapError(f"unknown parameter part {part!r}", hint="use mlp or block")
    out = []
    for b in blocks:
        mod = model.adapter.mlp(b) if part == "mlp" else model.adapter.blocks[b]
        out.extend(mod.parameters())
    return out


@contextlib.contextmanager
def restored(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Snapshot ``params`` (values and ``requires_grad``) and restore them on exit, so an edit
    lives only inside the ``with`` body and never reaches the caller's (or a saved) model."""
    saved = [(p, p.detach().clone(), p.requires_grad) for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v, rg in saved:
                p.copy_(v)
                p.requires_grad_(rg)
                p.grad = None


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch and switch torch to deterministic kernels for the body."""
    prev = torch.are_deterministic_algorithms_enabled()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def train_params(
    model,
    params: Sequence[torch.nn.Parameter],
    loss_fn,
    *,
    steps: int,
    lr: float,
    seed: int,
) -> list[float]:
    """Adam on ``params`` only (every other parameter frozen for the run) minimising
    ``loss_fn()``; returns the loss per step. Leaves the model in eval mode."""
    chosen = {id(p) for p in params}
    frozen = [(p, p.requires_grad) for p in model.hf.parameters()]
    for p, _ in frozen:
        p.requires_grad_(id(p) in chosen)
    losses = []
    try:
        with deterministic(seed):
            opt = torch.optim.Adam(params, lr=lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn()
                if not torch.isfinite(loss):
                    raise MedmapError(
                        f"the training loss became {float(loss)}", hint="lower the learning rate"
                    )
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        for p, rg in frozen:
            p.requires_grad_(rg)
        for p in params:
            p.grad = None
        model.hf.eval()
    return losses
