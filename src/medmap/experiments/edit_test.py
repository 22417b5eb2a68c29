"""Map-guided editing: are the blocks a knowledge map ranks highest the right ones to edit?

For a concept set (``drugs``), the facts the model knows (forced choice, :func:`knows`) are split
by item, per seed, into a *forget* half (trained on) and a *held-out* half (never trained on).
The forget facts are unlearned by gradient descent on their soft forced-choice margin
(log p(answer) − logsumexp log p(distractors)) plus ``retain_weight`` × the answer NLL of
*retain* facts of the control sets, training only the MLPs (``part="mlp"``, or whole blocks)
of ``k`` blocks chosen by

* ``map``: the ``k`` blocks with the highest lesion specificity of the forget facts (mean
  ``delta_nll`` of the forget facts minus that of the retain facts, ``site=part``), computed
  on the unedited model for that seed;
* ``random``: ``k`` uniformly drawn blocks, ``draws`` draws per seed;
* ``least``: the ``k`` lowest-ranked blocks of the same map.

Every choice gets the same steps, learning rate and loss. Measured after each edit, against the
unedited model: ``forget_drop`` = mean margin drop (nats) on the held-out facts of the set;
``control_drop`` = mean margin drop on the *evaluation* half of the control facts (not in the
retain term); ``neutral_increase`` = per-token NLL increase on neutral prose;
``selectivity`` = forget_drop − control_drop; ``ratio`` = forget_drop / max(control_drop,
``ratio_floor``) (the floor keeps a near-zero collateral from dividing by ~0). Summary CIs
bootstrap the runs: seeds for ``map``/``least``, seeds × draws for ``random``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medmap.analysis.results import make_rows
from medmap.analysis.stats import bootstrap_ci, two_sample_ci
from medmap.errors import MedmapError
from medmap.experiments.scoring import (
    answer_logprobs,
    choice_margins,
    mlp_params,
    neutral_nll,
    restored,
    soft_margins,
    train_params,
)
from medmap.techniques.lesioning import neutral_sentences

CHOICES = ("map", "random", "least")
METRICS = ("forget_drop", "forget_train_drop", "control_drop", "neutral_increase",
           "selectivity", "ratio")  # fmt: skip


@dataclass(frozen=True)
class Fact:
    """A scored fact: ``prompt`` → ``answer`` (the model's best accepted answer) against
    ``distractors``; ``item_id`` groups a concept's targets (splits never separate them)."""

    concept_set: str
    item_id: str
    target_id: str
    prompt: str
    answer: str
    distractors: tuple[str, ...]


def set_facts(
    model, name: str, *, max_items: int | None, max_distractors: int, seed: int, known_only: bool
) -> tuple[list[Fact], bool]:
    """Facts of concept set ``name`` with their forced choice; ``known_only`` keeps the known
    ones (falling back to all scored facts when fewer than 4 are known). Returns ``(facts,
    used_known)``."""
    from medmap.concepts.loader import load_concepts
    from medmap.techniques.knowledge import forced_choices, knows

    cs = load_concepts(name)
    # the same candidates as knows: distractors from the whole set, scored on knows' stratified
    # subset of max_items items; rows matched by (item, target), never by position
    every = list(cs.targets())
    real, _, _ = forced_choices(every, max_distractors=max_distractors, seed=seed)
    choice = {(t.item_id, t.target_id): (t, c) for t, c in zip(every, real)}
    kn = knows(model, cs, max_items=max_items, max_distractors=max_distractors, seed=seed)
    facts, known = [], []
    for _, row in kn.iterrows():
        t, ch = choice[(row["item_id"], row["target_id"])]
        if not ch.distractors:
            continue
        facts.append(Fact(cs.name, t.item_id, t.target_id, t.prompt, row["best_answer"],
                          tuple(ch.distractors)))  # fmt: skip
        known.append(bool(row["known"]))
    if not facts:
        raise MedmapError(f"concept set {name!r} has no fact with a distractor")
    kept = [f for f, k in zip(facts, known) if k]
    if known_only and len(kept) >= 4:
        return kept, True
    return facts, False


def split_items(facts: Sequence[Fact], seed: int) -> tuple[list[Fact], list[Fact]]:
    """Seeded half/half split of ``facts`` by item (a concept's targets stay together)."""
    items = sorted({f.item_id for f in facts})
    rng = np.random.default_rng(seed)
    order = [items[i] for i in rng.permutation(len(items))]
    first = set(order[: max(1, len(order) // 2)])
    a = [f for f in facts if f.item_id in first]
    b = [f for f in facts if f.item_id not in first]
    if not b:
        raise MedmapError("too few items to split into trained and held-out facts",
                          hint="use a set (or --max-items) with at least 2 items")  # fmt: skip
    return a, b


def margins(model, facts: Sequence[Fact]) -> np.ndarray:
    """Forced-choice margin (nats) of each fact's answer over its distractors."""
    return choice_margins(
        model, [f.prompt for f in facts], [f.answer for f in facts],
        [f.distractors for f in facts],
    )  # fmt: skip


def lesion_map(model, forget: Sequence[Fact], retain: Sequence[Fact], part: str, batch_size: int):
    """Per block ``0..L-1``: mean lesion ``delta_nll`` of ``forget`` minus that of ``retain``."""
    from medmap.techniques.lesioning import lesion

    def prof(facts):
        d = lesion(model, [f.prompt for f in facts], [f.answer for f in facts],
                   batch_size=batch_size, site=part)  # fmt: skip
        return d.groupby("block")["delta_nll"].mean()

    spec = prof(forget) - prof(retain)
    return spec.reindex(range(model.n_layers)).to_numpy(dtype=float)


def rank_blocks(score: np.ndarray) -> list[int]:
    """Blocks from the highest to the lowest score (ties: lower block first)."""
    return [int(b) for b in sorted(range(len(score)), key=lambda b: (-score[b], b))]


@dataclass(frozen=True)
class EditTestConfig:
    """Settings of one edit test (defaults sized for SmolLM2-135M on 2 CPU cores)."""

    concepts: str = "drugs"
    choose: tuple[str, ...] = CHOICES
    k: int = 3
    seeds: int = 3
    draws: int = 5
    steps: int = 20
    lr: float = 1e-4
    retain_weight: float = 1.0
    controls: tuple[str, ...] = ("countries", "animals")
    max_items: int | None = 24
    max_distractors: int = 5
    neutral_lines: int = 16
    part: str = "mlp"
    known_only: bool = True
    ratio_floor: float = 0.05
    seed: int = 0
    batch_size: int = 8
    n_boot: int = 1000

    def key(self, model_name: str) -> str:
        """Key of the per-edit cells: every setting an edit's row depends on. The number of
        seeds and draws, the choices and ``n_boot`` are left out: edit ``(seed s, choice,
        draw d)`` is the same in a run with more seeds or draws, which reuses it."""
        cell = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_CELL}
        blob = json.dumps({"model": model_name, **cell}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_NOT_IN_CELL = ("seeds", "draws", "choose", "n_boot")


def _check(model, cfg: EditTestConfig) -> None:
    for c in cfg.choose:
        if c not in CHOICES:
            raise MedmapError(f"unknown choice {c!r}", hint=f"use {', '.join(CHOICES)}")
    if not 1 <= cfg.k < model.n_layers:
        raise MedmapError(f"--k {cfg.k} is out of range", hint=f"use 1..{model.n_layers - 1}")
    if "random" in cfg.choose and cfg.draws < 1:
        raise MedmapError("--draws must be at least 1")
    if cfg.seeds < 1 or cfg.steps < 1 or cfg.lr <= 0:
        raise MedmapError("--seeds and --steps must be >= 1 and --lr > 0")
    if not cfg.controls:
        raise MedmapError("edit-test needs at least one control set", hint="pass --controls")
    if cfg.part not in ("mlp", "block"):
        raise MedmapError(f"unknown part {cfg.part!r}", hint="use mlp or block")


def unlearn(
    model, blocks: Sequence[int], forget: Sequence[Fact], retain: Sequence[Fact],
    cfg: EditTestConfig, seed: int,
) -> list[float]:  # fmt: skip
    """Unlearn ``forget`` in place, training only ``blocks`` (``cfg.part``); returns the losses.
    The caller restores the weights (:func:`medmap.experiments.scoring.restored`)."""
    fp, fa, fd = (
        [f.prompt for f in forget],
        [f.answer for f in forget],
        [f.distractors for f in forget],
    )
    rp, ra = [r.prompt for r in retain], [r.answer for r in retain]

    def loss() -> torch.Tensor:
        term = soft_margins(model, fp, fa, fd).mean()
        if retain and cfg.retain_weight:
            term = term - cfg.retain_weight * answer_logprobs(model, rp, ra).mean()
        return term

    params = mlp_params(model, blocks, cfg.part)
    return train_params(model, params, loss, steps=cfg.steps, lr=cfg.lr, seed=seed)


def edit_test(model, cfg: EditTestConfig, out: str | Path | None = None, *, progress=None):
    """Run the edit test; returns ``(table, summary)``.

    ``table``: one row per edit: ``model, concept_set, seed, choice, draw, blocks`` (comma list),
    ``n_forget, n_heldout, n_control, used_known`` and :data:`METRICS` plus ``known_before`` /
    ``known_after`` (held-out fraction known), ``loss_first``, ``loss_last``. ``summary``: tidy
    rows per choice and metric (mean, bootstrap CI over runs, ``n``) and ``map_minus_random`` /
    ``map_minus_least`` contrasts. With ``out``: ``out/edit_test.parquet`` and
    ``out/edit_test_summary.parquet``, and one cell file per edit under ``out/cells/`` (a rerun
    reuses finished edits). Weights are restored after every edit.
    """
    from medmap.run.outputs import write_parquet_atomic

    _check(model, cfg)
    say = progress or (lambda msg: None)
    n = model.n_layers
    say(f"scoring {cfg.concepts} and the control sets")
    facts, used_known = set_facts(model, cfg.concepts, max_items=cfg.max_items,
                                  max_distractors=cfg.max_distractors, seed=cfg.seed,
                                  known_only=cfg.known_only)  # fmt: skip
    controls = []
    for c in cfg.controls:
        controls += set_facts(model, c, max_items=cfg.max_items,
                              max_distractors=cfg.max_distractors, seed=cfg.seed,
                              known_only=cfg.known_only)[0]  # fmt: skip
    neutral = neutral_sentences(cfg.neutral_lines)
    key = cfg.key(model.name)
    cells = Path(out) / "cells" if out is not None else None
    neutral0 = neutral_nll(model, neutral)
    rows = []
    for s in range(cfg.seeds):
        seed = cfg.seed * 1000 + s
        forget, heldout = split_items(facts, seed)
        retain, ctrl_eval = split_items(controls, seed)
        # (choice, draw, blocks); map/least blocks come from the lesion map, computed only when
        # one of them is not a finished cell (a rerun with more seeds redoes no finished seed)
        plans: list[tuple[str, int, list[int] | None]] = [
            (c, 0, None) for c in ("map", "least") if c in cfg.choose
        ]
        if "random" in cfg.choose:
            for d in range(cfg.draws):
                rng = np.random.default_rng([seed, d])
                plans.append(("random", d, sorted(int(b) for b in rng.choice(n, cfg.k, False))))
        path_of = {
            (c, d): cells / f"edit-s{s}-{c}{d}-{key}.parquet" if cells else None
            for c, d, _ in plans
        }
        done = {cd for cd, path in path_of.items() if path is not None and path.exists()}
        if len(done) < len(plans):
            m_forget0, m_held0 = margins(model, forget), margins(model, heldout)
            m_ctrl0 = margins(model, ctrl_eval)
        if any(b is None and (c, d) not in done for c, d, b in plans):
            say(f"seed {s}: lesion map of the forget facts")
            order = rank_blocks(lesion_map(model, forget, retain, cfg.part, cfg.batch_size))
        for choice, draw, blocks in plans:
            path = path_of[choice, draw]
            if (choice, draw) in done:  # finished edit of an earlier run
                rows.append(pd.read_parquet(path))
                continue
            if blocks is None:
                blocks = sorted(order[: cfg.k] if choice == "map" else order[-cfg.k :])
            say(f"seed {s}: {choice} {draw} blocks {blocks}")
            with restored(mlp_params(model, blocks, cfg.part)):  # only these are trained
                losses = unlearn(model, blocks, forget, retain, cfg, seed)
                m_forget, m_held = margins(model, forget), margins(model, heldout)
                m_ctrl, nn1 = margins(model, ctrl_eval), neutral_nll(model, neutral)
            fd = float(np.mean(m_held0 - m_held))
            cd = float(np.mean(m_ctrl0 - m_ctrl))
            row = pd.DataFrame(
                [
                    {
                        "model": model.name,
                        "concept_set": cfg.concepts,
                        "seed": seed,
                        "choice": choice,
                        "draw": draw,
                        "blocks": ",".join(map(str, blocks)),
                        "k": cfg.k,
                        "n_forget": len(forget),
                        "n_heldout": len(heldout),
                        "n_control": len(ctrl_eval),
                        "used_known": used_known,
                        "forget_drop": fd,
                        "forget_train_drop": float(np.mean(m_forget0 - m_forget)),
                        "control_drop": cd,
                        "neutral_increase": nn1 - neutral0,
                        "selectivity": fd - cd,
                        "ratio": fd / max(cd, cfg.ratio_floor),
                        "known_before": float(np.mean(m_held0 > 0)),
                        "known_after": float(np.mean(m_held > 0)),
                        "loss_first": losses[0],
                        "loss_last": losses[-1],
                    }
                ]
            )
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_parquet_atomic(row, path)
            rows.append(row)
    table = pd.concat(rows, ignore_index=True)
    summary = edit_summary(table, n_boot=cfg.n_boot, seed=cfg.seed)
    if out is not None:
        write_parquet_atomic(table, Path(out) / "edit_test.parquet")
        write_parquet_atomic(summary, Path(out) / "edit_test_summary.parquet")
    return table, summary


def edit_summary(table: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Tidy rows (``layer = -1``, technique ``edit_test``, label = choice or contrast): per
    choice and metric the mean over runs with a percentile-bootstrap CI and ``n`` runs; the
    contrasts ``map_minus_random`` / ``map_minus_least`` (two-sample bootstrap)."""
    rows = []
    model, cset = str(table["model"].iloc[0]), str(table["concept_set"].iloc[0])
    base = dict(model=model, layer=-1, relative_depth=float("nan"), concept_set=cset,
                technique="edit_test", seed=seed, k=int(table["k"].iloc[0]))  # fmt: skip
    by = {c: g for c, g in table.groupby("choice", sort=True)}
    for choice, g in by.items():
        for metric in METRICS:
            est, lo, hi = bootstrap_ci(g[metric].to_numpy(float), n_boot=n_boot, seed=seed)
            rows.append({**base, "metric": metric, "label": choice, "value": est,
                         "ci_low": lo, "ci_high": hi, "n": len(g)})  # fmt: skip
    for other in ("random", "least"):
        if "map" in by and other in by:
            for metric in METRICS:
                a, b = by["map"][metric].to_numpy(float), by[other][metric].to_numpy(float)
                est, lo, hi = two_sample_ci(a, b, n_boot=n_boot, seed=seed)
                rows.append({**base, "metric": metric, "label": f"map_minus_{other}",
                             "value": est, "ci_low": lo, "ci_high": hi,
                             "baseline": float(b.mean()), "n": len(a) + len(b)})  # fmt: skip
    return make_rows(rows)
