"""Activation patching of the residual stream between counterfactual prompt pairs.

A pair is a *clean* prompt (answer ``clean_target``) and a *corrupt* prompt of the same token
length (answer ``corrupt_target``), e.g. the same template with another drug. Denoising
(``direction="denoise"``) copies the clean run's residual stream at residual index ``l``
(0 = block 0's input, ``l`` = after block ``l-1``, ``n_layers`` = after the last block) and token
positions ``p`` into the corrupt run; noising copies corrupt into clean.

Metric: logit difference ``LD = logit(clean answer's first token) − logit(corrupt answer's first
token)`` at the last prompt position, and ``restored = (LD_patched − LD_corrupt) / (LD_clean −
LD_corrupt)``: 1 = the clean behaviour, 0 = the corrupt behaviour (NaN when ``LD_clean ==
LD_corrupt``). For noising the same formula gives the fraction of clean behaviour that survives;
``noised_drop = 1 − restored`` is the normalised damage.

Efficiency: both runs are recorded once per chunk of pairs (:mod:`medmap.model.replay`); a cell
``(l, p)`` starts from the recorded base residual at ``l`` with positions ``p`` replaced and runs
only blocks ``l..`` with the recorded call arguments; cells of several positions at one layer are
stacked along the batch, and logits are computed at the last position only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from medmap.analysis.results import make_rows
from medmap.errors import MedmapError
from medmap.model.replay import Recording, can_stack, record, run_blocks, stacked_calls
from medmap.model.sites import Site, Trace, check_layers, submodule_kind
from medmap.model.targets import first_target_token
from medmap.model.tokens import Batch, encode, span_tokens
from medmap.run.cells import CellCache, cell_key, model_identity
from medmap.techniques.base import Cell, RunContext, Technique
from medmap.techniques.capture import iter_batches
from medmap.techniques.concept_io import as_concept_set, check_one_source, set_name
from medmap.techniques.summary import mean_ci, relative_depth
from medmap.techniques.sweep import sweep_cells

if TYPE_CHECKING:  # pragma: no cover
    from medmap.model.loading import MedmapModel

POSITIONS = ("last", "concept", "all")
Span = tuple[int, int]


def answer_token(tokenizer, prompt: str, answer: str) -> int:
    """Id of the token the model must predict right after ``prompt`` to start ``answer``
    (:func:`medmap.model.targets.first_target_token`, the one definition)."""
    if not answer:
        raise MedmapError("empty answer", hint="every pair needs a clean and a corrupt answer")
    tok = first_target_token(tokenizer, prompt, answer)
    if tok is None:
        raise MedmapError("the target adds no token to its prompt", hint="use a non-empty target")
    return tok


def _positions(positions) -> list[str]:
    pos = [positions] if isinstance(positions, str) else list(positions)
    bad = [p for p in pos if p not in POSITIONS]
    if bad or not pos:
        raise MedmapError(
            f"unknown patch position {bad[0] if bad else positions!r}",
            hint="use last, concept, all",
        )
    return list(dict.fromkeys(pos))


def _spans_of(spans, i: int) -> list[Span]:
    s = spans[i]
    if isinstance(s, tuple | list) and len(s) == 2 and all(isinstance(v, int) for v in s):
        return [tuple(s)]
    return [tuple(x) for x in s]


def position_masks(
    clean: Batch, corrupt: Batch, positions: list[str], concept_spans=None
) -> dict[str, torch.Tensor]:
    """Boolean masks ``(batch, seq)`` of the positions each patch kind replaces.

    ``concept_spans[i]``: a character span in the clean prompt, or ``(clean_span, corrupt_span)``;
    the tokens overlapping the clean span (and the corrupt span, if given) are patched; token
    indices agree between the prompts because they have the same token length and template.
    """
    b, s = clean.input_ids.shape
    out = {}
    for pos in positions:
        m = torch.zeros((b, s), dtype=torch.bool)
        for i in range(b):
            n = clean.lengths[i]
            if pos == "last":
                toks = [n - 1]
            elif pos == "all":
                toks = list(range(n))
            else:
                if concept_spans is None:
                    raise MedmapError(
                        "position 'concept' needs concept_spans",
                        hint="pass one character span (start, end) per pair",
                    )
                sp = _spans_of(concept_spans, i)
                toks = set(span_tokens(clean.offsets[i], sp[0]))
                if len(sp) > 1:
                    toks |= set(span_tokens(corrupt.offsets[i], sp[1]))
                toks = sorted(toks)
                if not toks:
                    raise MedmapError(f"the concept span of pair {i} covers no token")
            for t in toks:
                m[i, clean.token_index(i, t)] = True
        out[pos] = m
    return out


def _last_logits(model, final: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(final.shape[0], device=final.device)
    with torch.no_grad():
        return model.adapter.head(final[rows, last.to(final.device)]).float().cpu()


def patch(
    model: MedmapModel,
    clean_prompts: Sequence[str],
    corrupt_prompts: Sequence[str],
    clean_targets: Sequence[str],
    corrupt_targets: Sequence[str],
    layers: Sequence[int] | None = None,
    positions: str | Sequence[str] = "last",
    *,
    batch_size: int = 8,
    direction: str = "denoise",
    concept_spans: Sequence | None = None,
    concept_set: str = "custom",
    pair_ids: Sequence[str] | None = None,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
    site: str = "block",
) -> pd.DataFrame:
    """Patch residual activations between each clean/corrupt pair; one row per (layer, position, pair).

    Args:
        model: a :class:`medmap.MedmapModel`.
        clean_prompts / corrupt_prompts: pair ``i``'s two prompts (same token length).
        clean_targets / corrupt_targets: their answers; only each answer's first token is used.
        layers: residual indices ``0..n_layers`` to patch (``None`` = all).
        positions: ``"last"``, ``"concept"``, ``"all"`` or a list of them (swept with layers).
        batch_size: pairs per forward pass and per resumable cell (halved automatically when
            a batch runs out of memory, see :mod:`medmap.techniques.sweep`).
        direction: ``"denoise"`` (clean → corrupt run) or ``"noise"`` (corrupt → clean run).
        concept_spans: per pair, the concept's character span in the clean prompt (or a
            ``(clean_span, corrupt_span)`` tuple); required for ``"concept"``.
        cache_dir: directory of finished cells (one Parquet per layer × chunk of pairs).
        site: what is patched: ``"block"`` = the residual stream at residual index ``layer``
            (a block's output); ``"attn"`` / ``"mlp"`` = block ``layer - 1``'s attention / MLP
            output (sites ``attn_out`` / ``mlp_out``, before it is added to the residual; the
            whole mixture for a mixture-of-experts block), ``layer`` in ``1..n_layers``.

    Returns:
        Columns ``model, concept_set, n_layers, layer, position, direction, pair, pair_id,
        logit_diff_clean, logit_diff_corrupt, logit_diff_patched, restored, noised_drop``.
    """
    n_pairs = len(clean_prompts)
    if n_pairs == 0:
        raise MedmapError("no prompt pairs given", hint="pass at least one clean/corrupt pair")
    if not (len(corrupt_prompts) == len(clean_targets) == len(corrupt_targets) == n_pairs):
        raise MedmapError("clean/corrupt prompts and targets must have the same length")
    if direction not in ("denoise", "noise"):
        raise MedmapError(f"unknown direction {direction!r}", hint="use 'denoise' or 'noise'")
    if concept_spans is not None and len(concept_spans) != n_pairs:
        raise MedmapError(f"{len(concept_spans)} concept spans for {n_pairs} pairs")
    pos_list = _positions(positions)
    n = model.n_layers
    submodule_kind(site)  # validates
    layer_list = check_layers(layers, n)
    if site != "block":
        layer_list = [x for x in layer_list if x >= 1] if layers is None else layer_list
        if 0 in layer_list:
            raise MedmapError(
                f"patch layer 0 has no {site} output",
                hint=f"with site {site} patch layers are 1..{n} (layer l = block l-1)",
            )
    ids = [str(i) for i in range(n_pairs)] if pair_ids is None else [str(x) for x in pair_ids]
    tok = model.tokenizer
    for sl in iter_batches(n_pairs, batch_size):  # validate before any work
        _encode_pair_chunk(model, clean_prompts[sl], corrupt_prompts[sl], sl.start)
    clean_tok = [answer_token(tok, p, a) for p, a in zip(clean_prompts, clean_targets)]
    corrupt_tok = [answer_token(tok, p, a) for p, a in zip(corrupt_prompts, corrupt_targets)]
    cache = CellCache(cache_dir, "patching")
    ident = model_identity(model)

    def key_of(sl: slice, layer: int) -> str:
        return cell_key(
            technique="patching",
            model=ident,
            concept_set=concept_set,
            layer=layer,
            positions=pos_list,
            direction=direction,
            clean=list(clean_prompts[sl]),
            corrupt=list(corrupt_prompts[sl]),
            answers=[clean_tok[sl], corrupt_tok[sl]],
            spans=None if concept_spans is None else [str(s) for s in concept_spans[sl]],
            ids=ids[sl],
            **({} if site == "block" else {"site": site}),  # block keys as before (resumable)
        )

    def compute(sl: slice, todo: list[int], emit) -> None:
        chunk = _PatchChunk(
            model,
            clean_prompts[sl],
            corrupt_prompts[sl],
            clean_tok[sl],
            corrupt_tok[sl],
            pos_list,
            direction,
            None if concept_spans is None else concept_spans[sl],
            sl.start,
            site,
        )
        for layer in todo:
            df = chunk.cell(layer)
            df["pair_id"] = [ids[i] for i in df["pair"]]
            df.insert(0, "concept_set", concept_set)
            df.insert(0, "model", model.name)
            emit(layer, df)

    frames = sweep_cells(
        n_pairs, batch_size, layer_list, key_of, compute, cache,
        description="patching", progress=progress, what="pair",
    )  # fmt: skip
    out = pd.concat(frames, ignore_index=True)
    out["site"] = out["site"].fillna(site) if "site" in out else site  # cells cached before sites
    order = {p: i for i, p in enumerate(pos_list)}
    out = out.assign(_o=out["position"].map(order))
    out = out.sort_values(["layer", "_o", "pair"], kind="stable").drop(columns="_o")
    return out.reset_index(drop=True)


def _encode_pair_chunk(model, clean, corrupt, first: int) -> tuple[Batch, Batch]:
    cb = encode(model.tokenizer, clean, padding_side="right", max_length=model.max_length)
    xb = encode(model.tokenizer, corrupt, padding_side="right", max_length=model.max_length)
    for i, (a, b) in enumerate(zip(cb.lengths, xb.lengths)):
        if a != b:
            raise MedmapError(
                f"pair {first + i}: clean prompt has {a} tokens, corrupt prompt {b}",
                hint="patching needs counterfactual prompts of the same token length",
            )
    return cb, xb


class _PatchChunk:
    """Recorded clean and corrupt runs of one chunk of pairs; computes patch cells per layer."""

    def __init__(
        self,
        model,
        clean,
        corrupt,
        clean_tok,
        corrupt_tok,
        positions,
        direction,
        spans,
        first,
        site="block",
    ) -> None:
        self.model = model
        self.site = site
        self.kind = submodule_kind(site)
        self.positions = positions
        self.direction = direction
        self.first = first
        cb, xb = _encode_pair_chunk(model, clean, corrupt, first)
        dev = model.input_device
        subs = [] if site == "block" else [Site(self.kind, b) for b in range(model.n_layers)]
        rec_clean = record(model, cb.model_inputs(dev), sites=subs)
        rec_corrupt = record(model, xb.model_inputs(dev), sites=subs)
        self.n = model.n_layers
        self.last = torch.tensor([ln - 1 for ln in cb.lengths])
        self.a_clean = torch.tensor(clean_tok)
        self.a_corrupt = torch.tensor(corrupt_tok)
        self.ld_clean = self._ld(_last_logits(model, rec_clean.inputs[self.n], self.last))
        self.ld_corrupt = self._ld(_last_logits(model, rec_corrupt.inputs[self.n], self.last))
        self.base, self.src = (
            (rec_corrupt, rec_clean) if direction == "denoise" else (rec_clean, rec_corrupt)
        )
        self.masks = position_masks(cb, xb, positions, spans)
        self.stack = len(positions) > 1 and can_stack(model, self.base, len(positions))
        self._calls = stacked_calls(model, self.base, len(positions)) if self.stack else None

    def _ld(self, logits: torch.Tensor) -> torch.Tensor:
        r = torch.arange(logits.shape[0])
        return (logits[r, self.a_clean] - logits[r, self.a_corrupt]).double()

    def _patched(self, layer: int, pos: str, base: Recording, src: Recording) -> torch.Tensor:
        h, s = base.inputs[layer], src.inputs[layer]
        m = self.masks[pos].to(h.device)[..., None]
        return torch.where(m, s.to(h.device), h)

    def _sub_lds(self, layer: int) -> list[torch.Tensor]:
        """Logit differences with block ``layer - 1``'s sub-module output patched, per position."""
        blk, site = layer - 1, Site(self.kind, layer - 1)
        h, s = self.base.inputs[blk], self.src.sites[site]
        b, reps = len(self.last), len(self.positions)
        if self.stack:
            mask = torch.cat([self.masks[p] for p in self.positions])
            value = s.repeat(reps, *([1] * (s.dim() - 1)))
            with Trace(self.model.adapter, replace={site: (value, mask)}):
                final = run_blocks(
                    self.model, self.base, h.repeat(reps, 1, 1), blk, times=reps, calls=self._calls
                )
            logits = _last_logits(self.model, final, self.last.repeat(reps))
            return list(self._ld_rep(logits).split(b))
        lds = []
        for p in self.positions:
            with Trace(self.model.adapter, replace={site: (s, self.masks[p])}):
                final = run_blocks(self.model, self.base, h, blk)
            lds.append(self._ld(_last_logits(self.model, final, self.last)))
        return lds

    def cell(self, layer: int) -> pd.DataFrame:
        """Rows for every position of residual index ``layer`` (all pairs of the chunk)."""
        b = len(self.last)
        if self.site != "block":
            lds = self._sub_lds(layer)
        elif self.stack:
            hs = torch.cat([self._patched(layer, p, self.base, self.src) for p in self.positions])
            final = (
                run_blocks(
                    self.model, self.base, hs, layer, times=len(self.positions), calls=self._calls
                )
                if layer < self.n
                else hs
            )
            logits = _last_logits(self.model, final, self.last.repeat(len(self.positions)))
            lds = list(self._ld_rep(logits).split(b))
        else:
            lds = []
            for p in self.positions:
                h = self._patched(layer, p, self.base, self.src)
                final = run_blocks(self.model, self.base, h, layer) if layer < self.n else h
                lds.append(self._ld(_last_logits(self.model, final, self.last)))
        rows = []
        for p, ld in zip(self.positions, lds):
            denom = self.ld_clean - self.ld_corrupt
            restored = (ld - self.ld_corrupt) / denom
            restored = torch.where(denom.abs() > 1e-9, restored, torch.full_like(restored, np.nan))
            rows.append(
                pd.DataFrame(
                    {
                        "n_layers": self.n,
                        "layer": layer,
                        "position": p,
                        "direction": self.direction,
                        "site": self.site,
                        "pair": range(self.first, self.first + b),
                        "logit_diff_clean": self.ld_clean.numpy(),
                        "logit_diff_corrupt": self.ld_corrupt.numpy(),
                        "logit_diff_patched": ld.numpy(),
                        "restored": restored.numpy(),
                        "noised_drop": (1 - restored).numpy(),
                    }
                )
            )
        return pd.concat(rows, ignore_index=True)

    def _ld_rep(self, logits: torch.Tensor) -> torch.Tensor:
        reps = len(self.positions)
        r = torch.arange(logits.shape[0])
        a, c = self.a_clean.repeat(reps), self.a_corrupt.repeat(reps)
        return (logits[r, a] - logits[r, c]).double()


def patch_summary(df: pd.DataFrame, *, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Tidy rows from :func:`patch` output: mean ``restored`` per (set, layer, position, direction).

    Pairs with ``LD_clean == LD_corrupt`` (NaN) are left out (``n`` counts the rest). For
    ``direction == "noise"`` a second metric ``noised_drop`` (= 1 − restored) is added.
    ``baseline`` is the mean clean−corrupt logit-difference gap. Extra columns ``position``,
    ``direction`` and ``site`` (``block`` = residual stream, ``attn``, ``mlp``).
    """
    rows = []
    df = df.assign(site=df["site"].fillna("block")) if "site" in df else df.assign(site="block")
    keys = ["model", "concept_set", "n_layers", "site", "layer", "position", "direction"]
    for (model, cset, n_layers, site, layer, pos, direction), g in df.groupby(keys, sort=True):
        metrics = ["restored"] + (["noised_drop"] if direction == "noise" else [])
        for metric in metrics:
            est, lo, hi, cnt = mean_ci(g[metric].to_numpy(), n_boot=n_boot, seed=seed)
            rows.append(
                {
                    "model": model,
                    "layer": int(layer),
                    "relative_depth": relative_depth(int(layer), int(n_layers)),
                    "concept_set": cset,
                    "technique": "patching",
                    "metric": metric,
                    "value": est,
                    "ci_low": lo,
                    "ci_high": hi,
                    "baseline": float((g["logit_diff_clean"] - g["logit_diff_corrupt"]).mean()),
                    "n": cnt,
                    "seed": seed,
                    "position": pos,
                    "direction": direction,
                    "site": site,
                }
            )
    return make_rows(rows)


class NoPairsError(MedmapError):
    """No counterfactual pair of a concept set survives the model's tokenizer."""


def concept_pairs(model: MedmapModel, cs, max_pairs: int = 32, seed: int = 0) -> dict[str, list]:
    """Counterfactual pairs of a concept set as the plain lists :func:`patch` takes."""
    from medmap.concepts import counterfactual_pairs

    pairs = list(counterfactual_pairs(cs, model.tokenizer, max_pairs=max_pairs, seed=seed))
    if not pairs:
        raise NoPairsError(
            f"concept set {getattr(cs, 'name', '?')!r} yields no counterfactual pairs",
            hint="pairs need two items sharing a target id, disjoint answers and equal token length",
        )
    return {
        "clean_prompts": [p.clean.prompt for p in pairs],
        "corrupt_prompts": [p.corrupt.prompt for p in pairs],
        "clean_targets": [p.clean_answer for p in pairs],
        "corrupt_targets": [p.corrupt_answer for p in pairs],
        "concept_spans": [(tuple(p.clean.span), tuple(p.corrupt.span)) for p in pairs],
        "pair_ids": [f"{p.clean.item_id}>{p.corrupt.item_id}/{p.clean.target_id}" for p in pairs],
    }


def patch_concepts(
    model: MedmapModel,
    cs=None,
    *,
    clean_prompts: Sequence[str] | None = None,
    corrupt_prompts: Sequence[str] | None = None,
    clean_targets: Sequence[str] | None = None,
    corrupt_targets: Sequence[str] | None = None,
    concept_spans: Sequence | None = None,
    pair_ids: Sequence[str] | None = None,
    concept_set: str | None = None,
    layers: Sequence[int] | None = None,
    positions: str | Sequence[str] = ("last", "concept"),
    max_pairs: int = 32,
    batch_size: int = 8,
    direction: str = "denoise",
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
    site: str = "block",
) -> pd.DataFrame:
    """:func:`patch` over a concept set's counterfactual pairs or over plain pair lists, as tidy
    rows.

    Args:
        cs: a concept set (a :class:`~medmap.concepts.ConceptSet`, a bundled name or a
            ``.yaml``/``.csv`` path): up to ``max_pairs`` counterfactual pairs drawn with
            ``seed`` (:func:`concept_pairs`), with their concept spans and ids.
        clean_prompts / corrupt_prompts / clean_targets / corrupt_targets: instead of ``cs``,
            the plain lists :func:`patch` takes (pair ``i``, same token length), used whole;
            ``concept_spans`` (needed by position ``"concept"``) and ``pair_ids`` (default:
            the index) as in :func:`patch`.
        concept_set: the ``concept_set`` column (default: the set's name, or ``"custom"``).
        layers, positions, batch_size, direction, cache_dir, site: as in :func:`patch`
            (``site``: ``"block"``, ``"attn"`` or ``"mlp"``); ``n_boot`` / ``seed``: the CIs.

    Returns:
        :func:`patch_summary` rows (the :mod:`medmap.analysis.results` columns plus
        ``position``, ``direction`` and ``site``), the same shape for a concept set and for
        plain lists: the same pairs give the same rows whichever way they come.
    """
    plain = {
        "clean_prompts": clean_prompts,
        "corrupt_prompts": corrupt_prompts,
        "clean_targets": clean_targets,
        "corrupt_targets": corrupt_targets,
    }
    if check_one_source(cs, plain, "patching"):
        pairs = {k: list(v) for k, v in plain.items()}
        pairs["concept_spans"] = None if concept_spans is None else list(concept_spans)
        pairs["pair_ids"] = None if pair_ids is None else list(pair_ids)
        if concept_spans is None and "concept" in _positions(positions):
            raise MedmapError(
                "patching: position 'concept' needs concept_spans with plain prompt lists",
                hint="pass concept_spans=[(start, end), ...] (one per pair) or positions='last'",
            )
        name = concept_set or "custom"
    else:
        if concept_spans is not None or pair_ids is not None:
            raise MedmapError(
                "patching: concept_spans and pair_ids go with plain prompt lists",
                hint="a concept set gives its pairs' spans and ids itself",
            )
        cs = as_concept_set(cs)
        pairs = concept_pairs(model, cs, max_pairs=max_pairs, seed=seed)
        name = concept_set or set_name(cs)
    df = patch(
        model,
        layers=layers,
        positions=positions,
        batch_size=batch_size,
        direction=direction,
        concept_set=name,
        progress=progress,
        cache_dir=cache_dir,
        site=site,
        **pairs,
    )
    return patch_summary(df, n_boot=n_boot, seed=seed)


class PatchingTechnique(Technique):
    """Activation patching through the technique interface (:mod:`medmap.techniques.base`)."""

    name = "patching"
    title = "patching runs"
    map_rows = ("patching",)

    def run_cell(self, model: MedmapModel, cell: Cell, ctx: RunContext) -> pd.DataFrame:
        from medmap.analysis.results import COLUMNS

        cfg = ctx.config
        cs = ctx.causal_set(cell.concept_set, self)  # known targets only, with known_only
        if cs is None:  # too few known facts: the knows rows say so
            return pd.DataFrame(columns=COLUMNS)
        try:
            pairs = concept_pairs(model, cs, max_pairs=cfg.max_pairs, seed=cfg.seed)
        except NoPairsError as e:
            if ctx.strict:
                raise
            # One set without pairs must not sink a whole map: record nothing and say why.
            ctx.note(f"patching skipped for {cs.name}: {e}")
            return pd.DataFrame(columns=COLUMNS)
        frames = [
            patch(
                model,
                positions=list(cfg.patch_positions),
                batch_size=cfg.batch_size,
                direction=cfg.patch_direction,
                concept_set=str(getattr(cs, "name", "custom")),
                progress=ctx.progress,
                cache_dir=ctx.run.cells_dir(self.name, cell.key),
                site=site,
                **pairs,
            )
            for site in getattr(cfg, "patch_sites", ["block"])
        ]
        items = pd.concat(frames, ignore_index=True)
        ctx.keep_items(self.name, cell, items)
        from medmap.analysis.results import make_rows
        from medmap.techniques.summary import split_half_rows

        den = items[items["direction"] == "denoise"] if "direction" in items else items
        stab = split_half_rows(
            den, value="restored", map_name="patching", item="pair_id",
            by=("site", "position"), seed=cfg.seed,
        )  # fmt: skip
        return pd.concat(
            [patch_summary(items, n_boot=cfg.n_boot, seed=cfg.seed), make_rows(stab)],
            ignore_index=True,
        )
