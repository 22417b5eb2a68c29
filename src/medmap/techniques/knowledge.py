"""Does the model know the fact? Whole-answer forced choice against other items' answers.

For every rendered target of a set, the candidates are its accepted answers plus distractors:
the accepted answers of the set's other items with the same target id whose answer lists are
disjoint from this item's (compared stripped and case-insensitive, like the pair builder), then
the target's own ``distractors:`` from the concept file first, capped at ``max_distractors``
(seeded sample). Each candidate is scored by its whole-answer log-probability given the prompt
(nats, summed over its tokens; the lm-evaluation-harness ``acc`` convention) and per token
(``acc_norm`` here divides by the number of answer tokens, not by bytes as the harness does).

``known`` = the best accepted answer's summed log-probability beats every distractor's;
``margin`` = best accepted − best distractor (nats, > 0 iff known); ``chance`` = the probability
of ``known`` when candidates are exchangeable = ``n_accepted / n_candidates`` (``1 /
n_candidates`` for a single accepted answer).

The **moved-answer control** scores each item with another item's answers taken as right (a
seeded cycle through the items of the target id, skipping items whose answers overlap): same
prompt, the moved answers as accepted, the item's true answers and then its other distractors
(those not overlapping the moved answers) as distractors, capped the same way. A model that knows the facts scores near 0 there; a score near the real one
says the scoring measures something other than the fact (pitfall 8: first tokens are shared).

Speed: each distinct context is run once (``use_cache=True``, left-padded over a few prompts);
its KV cache rows are then selected for every candidate of that context and only the answer
tokens are run. A candidate whose first token merges across the prompt/answer boundary gets its
own context (the tokens before the merged token, see :mod:`medmap.model.targets`), so the
result always equals the plain full-sequence computation (tested).
"""

from __future__ import annotations

import copy
import inspect
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from medmap.concepts.loader import load_concepts
from medmap.errors import MedmapError
from medmap.model.targets import target_span
from medmap.model.tokens import _pad_id
from medmap.progress import progress_bar
from medmap.techniques.base import Technique
from medmap.techniques.concept_io import select_items

if TYPE_CHECKING:  # pragma: no cover
    from medmap.model.loading import MedmapModel

MAX_DISTRACTORS = 4


def _norm(answers: Sequence[str]) -> set[str]:
    return {a.strip().casefold() for a in answers}


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class _Cand:
    unit: int  # index of its context in the list of distinct contexts
    ids: tuple[int, ...]  # answer token ids (after the context)


def _tokenise(model: MedmapModel, prompts: Sequence[str], answers: Sequence[Sequence[str]]):
    """Distinct contexts (token tuples) and, per prompt, its candidates as :class:`_Cand`."""
    tok = model.tokenizer
    max_len = model.max_length
    units: dict[tuple[int, ...], int] = {}
    cands: list[list[_Cand]] = []
    for i, (p, answer_list) in enumerate(zip(prompts, answers)):
        row = []
        for a in answer_list:
            if not isinstance(a, str) or not a:
                raise MedmapError(f"candidate {a!r} of prompt {i} is empty")
            enc = tok(p + a, return_offsets_mapping=True, add_special_tokens=True)
            ids = [int(x) for x in enc["input_ids"]]
            if max_len is not None and len(ids) > max_len:
                raise MedmapError(
                    f"prompt {i} + answer {a!r} has {len(ids)} tokens, longer than the model "
                    f"context of {max_len}",
                    hint="shorten the prompt or the answer",
                )
            span = target_span([tuple(o) for o in enc["offset_mapping"]], ids, len(p))
            ctx = tuple(ids[: span.start])
            u = units.setdefault(ctx, len(units))
            row.append(_Cand(u, tuple(ids[span.start :])))
        cands.append(row)
    return list(units), cands


def _cache_kw(model) -> str:
    # transformers renamed ``past_key_values`` to ``cache`` (5.2x); older 5.x only has the former
    params = inspect.signature(model.hf.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward(model: MedmapModel, **kw):
    if "cache" in kw:
        kw[_cache_kw(model)] = kw.pop("cache")
    with torch.inference_mode():
        moved = {k: v.to(model.input_device) if torch.is_tensor(v) else v for k, v in kw.items()}
        return model.hf(**moved, use_cache=True)


def score_candidates(
    model: MedmapModel,
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]],
    *,
    batch_size: int = 32,
    prompt_batch: int = 8,
    advance=None,
) -> list[pd.DataFrame]:
    """Whole-answer log-probabilities of several candidate answers per prompt.

    Args:
        prompts: ``n`` prompts.
        answers: per prompt, its candidate completions (each is appended to the prompt as is).
        batch_size: candidate sequences per forward pass.
        prompt_batch: contexts per (left-padded) prompt pass.
        advance: progress callback, called with 1 per prompt pass.

    Returns:
        Per prompt, a DataFrame with one row per candidate (in order): ``logprob`` (nats, summed
        over the answer tokens), ``n_tokens``, ``per_token`` (= logprob / n_tokens) and
        ``first_rank`` (vocabulary entries scoring strictly higher than the answer's first
        token; 0 = top prediction).
    """
    if len(prompts) != len(answers):
        raise MedmapError(f"{len(prompts)} prompts but {len(answers)} candidate lists")
    contexts, cands = _tokenise(model, prompts, answers)
    flat = [(i, j, c) for i, row in enumerate(cands) for j, c in enumerate(row)]
    by_unit: dict[int, list[int]] = defaultdict(list)
    for f, (_, _, c) in enumerate(flat):
        by_unit[c.unit].append(f)
    logprob = np.zeros(len(flat))
    first_rank = np.zeros(len(flat), dtype=np.int64)
    pad = _pad_id(model.tokenizer)
    for g0 in range(0, len(contexts), prompt_batch):
        group = list(range(g0, min(g0 + prompt_batch, len(contexts))))
        lp = max(len(contexts[u]) for u in group)
        ids = torch.full((len(group), lp), pad, dtype=torch.long)
        mask = torch.zeros((len(group), lp), dtype=torch.long)
        for r, u in enumerate(group):  # left padding: every row's last column is its last token
            ids[r, lp - len(contexts[u]) :] = torch.tensor(contexts[u])
            mask[r, lp - len(contexts[u]) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = _forward(
            model, input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1
        )
        last = torch.log_softmax(out.logits[:, -1].float().cpu(), -1)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        members = [(r, f) for r, u in enumerate(group) for f in by_unit[u]]
        for f0 in range(0, len(members), batch_size):
            chunk = members[f0 : f0 + batch_size]
            rows = [r for r, _ in chunk]
            toks = [flat[f][2].ids for _, f in chunk]
            for (r, f), t in zip(chunk, toks):  # first answer token: from the prompt pass
                logprob[f] = float(last[r, t[0]])
                first_rank[f] = int((last[r] > last[r, t[0]]).sum())
            if max(len(t) for t in toks) == 1:
                continue
            lc = max(len(t) for t in toks) - 1  # the last answer token is never an input
            cids = torch.full((len(chunk), lc), pad, dtype=torch.long)
            cmask = torch.zeros((len(chunk), lc), dtype=torch.long)
            for k, t in enumerate(toks):
                cids[k, : len(t) - 1] = torch.tensor(t[:-1])
                cmask[k, : len(t) - 1] = 1
            sel = torch.tensor(rows)
            n_real = mask[sel].sum(-1, keepdim=True)
            cpos = n_real + torch.arange(lc)[None]
            c = copy.deepcopy(cache)
            c.batch_select_indices(sel.to(model.input_device))
            o = _forward(
                model,
                input_ids=cids,
                attention_mask=torch.cat([mask[sel], cmask], 1),
                position_ids=cpos,
                cache=c,
            )
            logp = torch.log_softmax(o.logits.float().cpu(), -1)
            for k, ((_, f), t) in enumerate(zip(chunk, toks)):
                if len(t) > 1:
                    nxt = torch.tensor(t[1:])
                    logprob[f] += float(
                        logp[k, : len(t) - 1].gather(1, nxt[:, None]).double().sum()
                    )
            del c, o, logp
        if advance is not None:
            advance(1)
    frames = [[] for _ in prompts]
    for f, (i, _, c) in enumerate(flat):
        frames[i].append((logprob[f], len(c.ids), int(first_rank[f])))
    res = []
    for rows in frames:
        df = pd.DataFrame(rows, columns=["logprob", "n_tokens", "first_rank"])
        df["per_token"] = df["logprob"] / df["n_tokens"]
        res.append(df[["logprob", "n_tokens", "per_token", "first_rank"]])
    return res


def n_prompt_passes(
    model: MedmapModel, prompts: Sequence[str], answers, prompt_batch: int = 8
) -> int:
    """How many prompt passes :func:`score_candidates` makes (for a progress bar's total)."""
    contexts, _ = _tokenise(model, prompts, answers)
    return -(-len(contexts) // prompt_batch)


def score_answers(
    model: MedmapModel,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 32,
    advance=None,
) -> pd.DataFrame:
    """Per (prompt, answer) pair: ``logprob`` (nats, summed), ``n_tokens``, ``per_token`` and
    ``rank`` (first answer token's rank; 0 = top prediction)."""
    frames = score_candidates(
        model, prompts, [[a] for a in answers], batch_size=batch_size, advance=advance
    )
    df = pd.concat(frames, ignore_index=True)
    return df.rename(columns={"first_rank": "rank"})


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Choice:
    """One forced choice: ``accepted`` answers against ``distractors`` for a target's prompt."""

    accepted: tuple[str, ...]
    distractors: tuple[str, ...]

    @property
    def candidates(self) -> tuple[str, ...]:
        return self.accepted + self.distractors


def _choice(accepted, own_extra, others, cap: int, rng: random.Random) -> Choice:
    """Distractors: ``own_extra`` first, then the others' answers disjoint from ``accepted``."""
    acc = _norm(accepted)
    seen = set(acc)
    extra: list[str] = []
    for d in own_extra:
        if d.strip().casefold() not in seen:
            seen.add(d.strip().casefold())
            extra.append(d)
    pool: list[str] = []
    for answers in others:
        if _norm(answers) & acc:
            continue
        for a in answers:
            if a.strip().casefold() not in seen:
                seen.add(a.strip().casefold())
                pool.append(a)
    extra = extra[:cap]
    room = cap - len(extra)
    if len(pool) > room:
        pool = rng.sample(pool, room)
    return Choice(tuple(accepted), tuple(extra + pool))


def forced_choices(
    targets: Sequence, *, max_distractors: int = MAX_DISTRACTORS, seed: int = 0
) -> tuple[list[Choice], list[Choice | None], list[int | None]]:
    """Candidate sets of rendered targets, for the real answers and the moved-answer control.

    Returns ``(real, control, moved_from)``: per target, its :class:`Choice`; the control
    choice (another item's answers as accepted, ``None`` when no item of the target id has
    disjoint answers); and the index of the target whose answers were moved (or ``None``).
    The cap draw and the moved-answer cycle are seeded by ``seed`` and the item/target ids.
    """
    by_tid: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        by_tid[t.target_id].append(i)
    real: list[Choice] = [None] * len(targets)  # type: ignore[list-item]
    control: list[Choice | None] = [None] * len(targets)
    moved: list[int | None] = [None] * len(targets)
    for tid, idx in by_tid.items():
        for i in idx:
            t = targets[i]
            others = [targets[j].answers for j in idx if targets[j].item_index != t.item_index]
            rng = random.Random(f"{seed}:{t.item_id}:{tid}")
            real[i] = _choice(
                t.answers, getattr(t, "distractors", ()), others, max_distractors, rng
            )
        order = list(idx)
        random.Random(f"{seed}:moved:{tid}").shuffle(order)
        for k, i in enumerate(order):
            t = targets[i]
            for step in range(1, len(order)):
                j = order[(k + step) % len(order)]
                if not (_norm(targets[j].answers) & _norm(t.answers)):
                    moved[i] = j
                    break
            if moved[i] is None:
                continue
            m = targets[moved[i]]
            # the moved answers take the place of the item's own, which become distractors
            # beside the item's other distractors (so the control costs almost no extra pass)
            wrong = _norm(m.answers)
            dis = [d for d in t.answers + real[i].distractors if d.strip().casefold() not in wrong]
            control[i] = Choice(tuple(m.answers), tuple(dis[:max_distractors]))
    return real, control, moved


def _decide(choice: Choice | None, scores: dict[str, pd.Series]) -> dict:
    if choice is None or not choice.distractors:
        nan = float("nan")
        return dict(known=False, known_norm=False, margin=nan, margin_per_token=nan, best=None)
    acc = [scores[a] for a in choice.accepted]
    dis = [scores[d] for d in choice.distractors]
    best = max(range(len(acc)), key=lambda q: acc[q]["logprob"])
    best_d = max(d["logprob"] for d in dis)
    best_norm = max(a["per_token"] for a in acc)
    best_d_norm = max(d["per_token"] for d in dis)
    return dict(
        known=bool(acc[best]["logprob"] > best_d),
        known_norm=bool(best_norm > best_d_norm),
        margin=float(acc[best]["logprob"] - best_d),
        margin_per_token=float(best_norm - best_d_norm),
        best=best,
    )


def knows(
    model: MedmapModel,
    concepts,
    *,
    k: int = 10,
    max_items: int | None = None,
    max_distractors: int = MAX_DISTRACTORS,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> pd.DataFrame:
    """Forced-choice knowledge of every item × target, with the moved-answer control.

    Args:
        model: a :class:`medmap.MedmapModel`.
        concepts: a concept set or its name/path.
        k: ``first_token_known`` = the best answer's first token has rank < ``k`` (the old,
            uninformative criterion, kept as an extra column).
        max_items: score a stratified, seeded subset of ``max_items`` items (the map's
            ``select_items``); distractors still come from every item of the set.
        max_distractors: cap on distractors per target (seeded sample).
        seed: seeds the distractor sample and the moved-answer cycle.
        batch_size: candidate sequences per forward pass.

    Returns:
        One row per (item, target): ``model, concept_set, item_id, target_id, prompt,
        best_answer, logprob, logprob_per_token, n_tokens, rank, first_token_known,
        n_candidates, n_accepted, chance, best_distractor, margin, margin_per_token, known,
        known_norm, control_item_id, control_n_candidates, control_chance, control_margin,
        control_known`` (log-probabilities and margins in nats; ``known`` is a bool; a target
        without any distractor has ``n_candidates == n_accepted``, ``known`` False and NaN
        margin, and is left out of :func:`known_fraction`).
    """
    cs = load_concepts(concepts)
    targets = list(cs.targets())
    if not targets:
        raise MedmapError(f"concept set {cs.name!r} has no targets to score")
    # distractors and moved answers come from the whole set, whatever subset is scored
    real, control, moved = forced_choices(targets, max_distractors=max_distractors, seed=seed)
    keep = list(range(len(targets)))
    if max_items is not None:
        sub = select_items(cs, max_items, seed)  # stratified, seeded: the map's item subset
        ids = {it.id for it in sub.items} if hasattr(sub, "items") else None
        keep = [i for i, t in enumerate(targets) if ids is None or t.item_id in ids]
    real = [real[i] for i in keep]
    control = [control[i] for i in keep]
    moved = [moved[i] for i in keep]
    all_targets, targets = targets, [targets[i] for i in keep]
    cand_lists = []
    for r, c in zip(real, control):
        want = list(dict.fromkeys(r.candidates + (c.candidates if c else ())))
        cand_lists.append(want)
    prompts = [t.prompt for t in targets]
    total = n_prompt_passes(model, prompts, cand_lists)
    with progress_bar(f"knows {cs.name}", total=total, enabled=progress) as advance:
        frames = score_candidates(
            model, prompts, cand_lists, batch_size=batch_size, advance=advance
        )
    rows = []
    for i, t in enumerate(targets):
        scores = {a: frames[i].iloc[q] for q, a in enumerate(cand_lists[i])}
        d = _decide(real[i], scores)
        best_i = d["best"] if d["best"] is not None else 0
        best = scores[real[i].accepted[best_i]]
        dis = real[i].distractors
        bd = max(dis, key=lambda a: scores[a]["logprob"]) if dis else None
        cd = _decide(control[i], scores)
        n_c = len(control[i].candidates) if control[i] else 0
        n_ca = len(control[i].accepted) if control[i] else 0
        rows.append(
            {
                "model": model.name,
                "concept_set": cs.name,
                "item_id": t.item_id,
                "target_id": t.target_id,
                "prompt": t.prompt,
                "best_answer": real[i].accepted[best_i],
                "logprob": float(best["logprob"]),
                "logprob_per_token": float(best["per_token"]),
                "n_tokens": int(best["n_tokens"]),
                "rank": int(best["first_rank"]),
                "first_token_known": bool(best["first_rank"] < k),
                "n_candidates": len(real[i].candidates),
                "n_accepted": len(real[i].accepted),
                "chance": len(real[i].accepted) / len(real[i].candidates),
                "best_distractor": bd,
                "margin": d["margin"],
                "margin_per_token": d["margin_per_token"],
                "known": d["known"],
                "known_norm": d["known_norm"],
                "control_item_id": all_targets[moved[i]].item_id if moved[i] is not None else None,
                "control_n_candidates": n_c,
                "control_chance": n_ca / n_c if n_c else float("nan"),
                "control_margin": cd["margin"],
                "control_known": cd["known"],
            }
        )
    return pd.DataFrame(rows)


def _scored(df: pd.DataFrame) -> pd.DataFrame:
    """The targets of :func:`knows` output that have a distractor, ``control_known`` as float
    (NaN for a target without a moved-answer control: no item with disjoint answers, no null)."""
    d = df[df["n_candidates"] > df["n_accepted"]].copy()
    d["control_known"] = d["control_known"].astype(float).where(d["control_n_candidates"] > 0)
    return d


def known_fraction(df: pd.DataFrame) -> pd.DataFrame:
    """Per (model, concept set) from :func:`knows` output: ``known`` (fraction, summed
    log-probability), ``known_norm`` (per token), ``chance`` (mean chance level),
    ``control`` (moved-answer fraction known), ``control_chance`` and ``n`` (scored targets:
    those with at least one distractor)."""
    d = _scored(df)
    g = d.groupby(["model", "concept_set"], sort=True)
    out = g.agg(
        known=("known", "mean"),
        known_norm=("known_norm", "mean"),
        chance=("chance", "mean"),
        control=("control_known", "mean"),
        control_chance=("control_chance", "mean"),
        n=("known", "size"),
    )
    return out.reset_index()


def known_items(df: pd.DataFrame) -> set[tuple[str, str]]:
    """``(item_id, target_id)`` of the known targets in :func:`knows` output."""
    k = df[df["known"].astype(bool)]
    return set(zip(k["item_id"], k["target_id"]))


# --------------------------------------------------------------------------- in a run

MIN_KNOWN = 8


def knows_summary(
    df: pd.DataFrame, *, min_known: int = MIN_KNOWN, n_boot: int = 200, seed: int = 0
) -> pd.DataFrame:
    """Tidy rows (technique ``knows``, ``layer`` −1) per (model, concept set) of :func:`knows`
    output: ``known_fraction`` (baseline: mean chance), ``moved_known_fraction`` (the
    moved-answer control; baseline: its chance), ``margin`` (mean, nats),
    ``known_above_chance`` (1 when the known fraction's CI lies above both its chance level and
    the moved-answer fraction, the baseline; 0: the "known" targets may be lucky guesses),
    ``n_known`` (count; baseline: targets scored) and ``too_few_known`` (1 when ``n_known <
    min_known``: the set is reported, not mapped). ``n`` = targets scored (those with a distractor)."""
    from medmap.analysis.results import make_rows
    from medmap.techniques.summary import mean_ci

    rows = []
    d = _scored(df)
    for (model, cset), g in d.groupby(["model", "concept_set"], sort=True):
        base = dict(model=model, layer=-1, concept_set=cset, technique="knows", seed=seed)
        for metric, col, chance in (
            ("known_fraction", "known", g["chance"].mean()),
            ("moved_known_fraction", "control_known", g["control_chance"].mean()),
            ("margin", "margin", float("nan")),
        ):
            est, lo, hi, cnt = mean_ci(g[col].astype(float).to_numpy(), n_boot=n_boot, seed=seed)
            rows.append(
                {**base, "metric": metric, "value": est, "ci_low": lo, "ci_high": hi,
                 "baseline": float(chance), "n": cnt}
            )  # fmt: skip
        kf = next(r for r in rows[::-1] if r["metric"] == "known_fraction")
        mv = next(r for r in rows[::-1] if r["metric"] == "moved_known_fraction")
        floor = max(kf["baseline"], mv["value"] if np.isfinite(mv["value"]) else 0.0)
        rows.append(
            {**base, "metric": "known_above_chance", "value": float(kf["ci_low"] > floor),
             "baseline": float(floor), "n": len(g)}
        )  # fmt: skip
        n_known = int(g["known"].sum())
        rows.append(
            {**base, "metric": "n_known", "value": n_known, "baseline": len(g), "n": len(g)}
        )
        rows.append(
            {**base, "metric": "too_few_known", "value": float(n_known < min_known),
             "baseline": float(min_known), "n": len(g)}
        )  # fmt: skip
    return make_rows(rows)


def known_only(cs, df: pd.DataFrame, *, min_known: int = MIN_KNOWN):
    """The concept set restricted to its known targets (``known`` rows of :func:`knows` output
    for this set); items with no known target are dropped, and each kept target's accepted
    answers start with the one the model scored best (``best_answer``: the answer the causal
    techniques score). Counterfactual pairs built from the result therefore have both prompts
    known. ``None`` when fewer than ``min_known`` targets are
    known ("too few known facts": report the set, do not map it)."""
    name = getattr(cs, "name", None)
    rows = df[df["concept_set"] == name] if name is not None else df
    keep = known_items(rows)
    if len(keep) < min_known:
        return None
    best = dict(zip(zip(rows["item_id"], rows["target_id"]), rows["best_answer"]))
    items = []
    for it in cs.items:
        targets = []
        for t in it.targets:
            if (it.id, t.id) not in keep:
                continue
            b = best.get((it.id, t.id))
            if b in t.answers and t.answers[0] != b:  # the answer the model chose comes first
                t = t.model_copy(update={"answers": [b, *(a for a in t.answers if a != b)]})
            targets.append(t)
        if targets:
            items.append(it.model_copy(update={"targets": targets}))
    return cs.model_copy(update={"items": items})


class KnowsTechnique(Technique):
    """``knows`` as a run stage: forced choice on every target of the whole set (``max_targets``
    trimmed; ``knows_max_items`` bounds it to a stratified subset, distractors still from the
    whole set), so the causal stages can fill their budget with known items; the
    per-target frame stored for them (``Run.knows_part``), tidy summary rows."""

    name = "knows"
    title = "knowledge checks"
    map_rows = ()

    def item_budget(self, config) -> int | None:
        return config.knows_max_items

    def run_cell(self, model: MedmapModel, cell, ctx) -> pd.DataFrame:
        from medmap.run.outputs import write_parquet_atomic

        cfg = ctx.config
        cs = ctx.trim_targets(load_concepts(cell.concept_set))
        df = knows(
            model,
            cs,
            max_items=cfg.knows_max_items,  # a stratified subset; distractors from the whole set
            max_distractors=cfg.knows_distractors,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            progress=ctx.progress,
        )
        write_parquet_atomic(df, ctx.run.knows_part(cell.key))  # before the cell: see RunContext
        return knows_summary(df, min_known=cfg.min_known, n_boot=cfg.n_boot, seed=cfg.seed)
