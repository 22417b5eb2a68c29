"""Weight-gradient saliency: which weights the loss of a medical fact is most sensitive to.

Two objectives (``objective``), each a loss of item ``i`` in nats:

* ``"nll"``: the negative log-likelihood (summed over target tokens) of ``targets[i]`` appended
  to ``prompts[i]`` (see :mod:`medmap.model.targets`);
* ``"margin"``: minus the forced-choice margin, ``-(log p(a | p) - max_j log p(d_j | p))`` with
  ``a = targets[i]`` (the scored answer) and ``d_j`` the item's distractors, each a whole-answer
  log-probability summed over its tokens (:func:`answer_logprobs`, the knows stage's margin,
  :mod:`medmap.techniques.knowledge`). Its gradient flows into the answer and the best distractor
  only (the max picks one). The NLL is about the answer's fluency as much as the fact; the
  margin contrasts the fact with the other answers (pitfall 10 of the notes: a raw NLL profile
  is generic). The sign of the loss does not matter for the metrics (all use ``|g|``).

One backward pass per item gives per-item gradients. Every parameter is assigned to a part of
the model:

* ``embedding`` (layer 0): the token embedding (and e.g. GPT-2's position embedding);
* per block ``b`` (layer ``b + 1``): ``attention``, ``mlp``, ``norm`` (or ``other``) by the
  sub-module the parameter sits in, from the module tree
  (:meth:`medmap.model.adapter.LayerAdapter.param_kind`; a norm inside the attention, Qwen3's
  ``q_norm``, counts as attention; a mixture of experts, router included, counts as ``mlp``),
  plus ``block`` = the whole block;
* for mixture-of-experts blocks also ``expert.<e>`` (expert ``e``'s weights: its slice of the
  fused ``(n_experts, ...)`` tensors, or its own module) and ``router``: sub-parts of that
  block's ``mlp`` row (their shares sum to the ``mlp`` share);
* ``final_norm`` and ``unembedding`` (layer -1).

Tied weights (SmolLM2 and Gemma share the embedding and output matrix) are one tensor: it is
reported once, as ``embedding``, and no ``unembedding`` row appears.

Per item and part: ``grad_abs_mean`` = mean |∂L/∂w| over the part's weights, ``grad_x_weight_mean``
= mean |w · ∂L/∂w|, and ``*_share`` = the part's sum divided by the sum over the whole model
(distinct tensors counted once; the shares of embedding + blocks + final norm + unembedding +
other sum to 1).

Memory: each parameter's gradient is reduced to two sums as soon as autograd has finished it,
and freed at once (:class:`medmap.techniques.saliency.gradstats.GradReducer`), so at most one parameter's
gradient is alive (peak ≈ weights + activations + the largest single gradient instead of all of
them). ``requires_grad`` is switched on for the pass and restored afterwards. Sums are float64
and moved to the CPU, so models split with ``device_map`` over devices work, and so do weights
that accelerate offloads to CPU RAM or disk (their gradients are taken from the copy accelerate
materialises for each forward).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from medmap.analysis.results import make_rows
from medmap.batching import free_memory, is_oom
from medmap.errors import MedmapError
from medmap.model.targets import answer_logprobs as _answer_logprobs
from medmap.model.targets import encode_targets
from medmap.run.cells import CellCache, cell_key, model_identity
from medmap.techniques.base import Cell, RunContext, Technique
from medmap.techniques.concept_io import concept_targets, plain_or_concepts, set_name
from medmap.techniques.saliency.gradstats import GradReducer
from medmap.techniques.summary import mean_ci, relative_depth, specificity_row
from medmap.techniques.sweep import sweep_cells

if TYPE_CHECKING:  # pragma: no cover
    from medmap.model.loading import MedmapModel

METRICS = ("grad_abs_mean", "grad_x_weight_mean", "grad_abs_share", "grad_x_weight_share")


# adapter parameter kind -> saliency module label of a block parameter
_BLOCK_MODULE = {
    "attn": "attention",
    "mlp": "mlp",
    "expert": "mlp",
    "router": "mlp",
    "norm": "norm",
    "embed": "other",
    "unembed": "other",
    "other": "other",
}


@dataclass
class ParamGroups:
    """Each distinct parameter tensor's (layer, module) and the model's groups.

    ``experts``: ``(k, layer, expert, n_fused)`` for expert weights (``expert`` = its index when
    experts are separate modules, else ``None`` and ``n_fused`` experts stacked along dim 0);
    ``routers``: ``(k, layer)``.
    """

    params: list[torch.nn.Parameter]
    names: list[str]
    group_of: list[tuple[int, str]]
    groups: list[tuple[int, str]] = field(default_factory=list)
    aliases: list[list[str]] = field(default_factory=list)  # every qualified name of params[k]
    experts: list[tuple[int, int, int | None, int | None]] = field(default_factory=list)
    routers: list[tuple[int, int]] = field(default_factory=list)

    @property
    def splits(self) -> dict[int, int]:
        """Parameter index -> number of fused experts to reduce separately along dim 0."""
        return {k: n for k, _, e, n in self.experts if e is None and n}


def param_groups(model) -> ParamGroups:
    """Assign every distinct parameter of ``model.hf`` to ``(layer, module)`` (see docstring)."""
    ad = model.adapter
    where: dict[int, tuple[int, str]] = {}
    for p in ad.embed.parameters():
        where.setdefault(id(p), (0, "embedding"))
    prefix = {id(m): n for n, m in model.hf.named_modules()}
    for i, blk in enumerate(ad.blocks):
        for name, p in blk.named_parameters():
            kind = ad.param_kind(f"{prefix[id(blk)]}.{name}")
            where.setdefault(id(p), (i + 1, _BLOCK_MODULE[kind]))
    if ad.final_norm is not None:
        for p in ad.final_norm.parameters():
            where.setdefault(id(p), (-1, "final_norm"))
    for p in ad.unembed.parameters():
        where.setdefault(id(p), (-1, "unembedding"))
    params, names, group_of = [], [], []
    for name, p in model.hf.named_parameters():  # distinct tensors only (tied counted once)
        g = where.get(id(p))
        if g is None:
            low = name.lower()
            g = (
                (0, "embedding")
                if ("emb" in low or "wpe" in low or "wte" in low)
                else (-1, "other")
            )
        params.append(p)
        names.append(name)
        group_of.append(g)
    order = {
        "embedding": 0,
        "attention": 1,
        "mlp": 2,
        "norm": 3,
        "other": 4,
        "final_norm": 5,
        "unembedding": 6,
    }
    groups = sorted(set(group_of), key=lambda g: (g[0] if g[0] >= 0 else 10**9, order[g[1]]))
    k_of = {id(p): k for k, p in enumerate(params)}
    aliases: list[list[str]] = [[] for _ in params]
    for name, p in model.hf.named_parameters(remove_duplicate=False):
        aliases[k_of[id(p)]].append(name)
    experts, routers = [], []
    for k, name in enumerate(names):
        kind = ad.param_kind(name)
        if kind == "expert":
            e = ad.expert_index(name)
            experts.append(
                (k, ad.param_block(name) + 1, e, None if e is not None else ad.fused_experts(name))
            )
        elif kind == "router":
            routers.append((k, ad.param_block(name) + 1))
    return ParamGroups(params, names, group_of, groups, aliases, experts, routers)


def item_loss(model, prompt: str, target: str) -> torch.Tensor:
    """NLL (nats) of ``target`` after ``prompt``, summed over the target tokens (differentiable)."""
    return -answer_logprobs(model, prompt, [target])[0]


OBJECTIVES = ("nll", "margin")


def answer_logprobs(model, prompt: str, answers: Sequence[str]) -> torch.Tensor:
    """Whole-answer log-probabilities of ``answers`` after one ``prompt`` (differentiable).

    One right-padded forward pass of the ``len(answers)`` sequences ``prompt + answer``
    (:func:`medmap.model.targets.answer_logprobs`).

    Returns:
        float32 tensor of shape ``(len(answers),)``: ``log p(answer | prompt)`` in nats, summed
        over the answer's tokens (on the logits' device).
    """
    return _answer_logprobs(model, [prompt] * len(answers), list(answers), batch_size=len(answers))


def margin_loss(model, prompt: str, answer: str, distractors: Sequence[str]) -> torch.Tensor:
    """Minus the forced-choice margin (nats, scalar, differentiable):
    ``max_j log p(d_j | prompt) - log p(answer | prompt)`` (:func:`answer_logprobs`, one pass).

    Negative when the answer beats every distractor (the fact is known). The gradient reaches
    the answer's and the best distractor's log-probabilities only.
    """
    if not distractors:
        raise MedmapError("the margin needs at least one distractor", hint="pass distractors")
    lp = answer_logprobs(model, prompt, [answer, *distractors])
    return lp[1:].max() - lp[0]


def _nonfinite_loss(model, prompt: str, target: str | Sequence[str], i: int) -> None:
    """Raise a one-line error for a NaN/inf loss, naming the first non-finite layer if any.

    ``target``: the answer, or every answer whose sequence entered the loss."""
    from medmap.model.replay import record

    for t in [target] if isinstance(target, str) else target:
        batch, _ = encode_targets(model.tokenizer, [prompt], [t], max_length=model.max_length)
        record(model, batch.model_inputs(model.input_device))  # raises naming the layer
    raise MedmapError(
        f"non-finite loss (NaN/inf) for item {i} after the last layer (final norm or unembedding)",
        hint="fp16 overflow is the usual cause: load the model with dtype=bfloat16 or float32",
    )


def saliency_items(
    model: MedmapModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    concept_set: str = "custom",
    item_ids: Sequence[str] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
    distractors: Sequence[Sequence[str]] | None = None,
    objective: str = "nll",
) -> pd.DataFrame:
    """Per-item saliency: one row per (item, layer, module) with the four metrics.

    Args:
        targets: per item, the answer whose loss is differentiated (the scored answer).
        distractors: per item, its wrong answers; needed by ``objective="margin"`` (every item
            at least one), ignored by ``"nll"``.
        objective: ``"nll"`` (the target's NLL) or ``"margin"`` (minus its forced-choice margin
            against the distractors), see the module docstring.

    Columns: ``model, concept_set, n_layers, objective, item, item_id, loss, layer, module,
    numel, grad_abs_sum, grad_x_weight_sum`` and :data:`METRICS`; ``loss`` (nats) is the
    objective's loss: the NLL, or ``-margin``. ``df.attrs`` holds ``peak_grad_bytes`` (most
    gradient bytes alive at once during the computed items) and ``total_grad_bytes`` (all
    parameters' gradients, what a plain ``backward`` keeps). ``batch_size`` items form one
    resumable cell of the shared sweep (:func:`medmap.techniques.sweep.sweep_cells`, one
    pseudo-layer, no batch back-off: gradients are always per item, one backward pass each);
    the margin's cells are keyed by the objective and the distractors too, the NLL's as before
    the margin existed. The progress bar counts items and advances once per finished cell.
    """
    if len(prompts) == 0:
        raise MedmapError("no prompts given", hint="pass at least one prompt")
    ids = [str(i) for i in range(len(prompts))] if item_ids is None else [str(x) for x in item_ids]
    if len(ids) != len(prompts):
        raise MedmapError(f"{len(ids)} item ids for {len(prompts)} prompts")
    encode_targets(model.tokenizer, prompts, targets, max_length=model.max_length)  # validate
    dis = _check_distractors(model, prompts, ids, distractors, objective)
    pg = param_groups(model)
    gidx = {g: j for j, g in enumerate(pg.groups)}
    member = np.array([gidx[g] for g in pg.group_of])
    numel = np.array([p.numel() for p in pg.params], dtype=float)
    g_numel = np.bincount(member, weights=numel, minlength=len(pg.groups))
    block_of = np.array(
        [
            g[0] if g[1] not in ("embedding", "final_norm", "unembedding") and g[0] > 0 else -1
            for g in pg.group_of
        ]
    )
    cache = CellCache(cache_dir, "saliency")
    ident = model_identity(model)
    flags = {n: p.requires_grad for n, p in model.hf.named_parameters(remove_duplicate=False)}
    state: dict[str, GradReducer] = {}  # the reducer, made when the first cell is computed

    def key_of(sl: slice, _layer: int) -> str:
        margin = {} if dis is None else {"objective": objective, "distractors": dis[sl]}
        return cell_key(
            technique="saliency",
            model=ident,
            concept_set=concept_set,
            prompts=list(prompts[sl]),
            targets=list(targets[sl]),
            ids=ids[sl],
            **margin,  # nll cells keyed as before the margin existed (resumable)
        )

    def compute(sl: slice, _layers: list[int], emit) -> None:
        if "reducer" not in state:  # requires_grad only once a cell is really computed
            for p in pg.params:
                p.grad = None
                p.requires_grad_(True)
            state["reducer"] = GradReducer(pg.params, model.hf, pg.aliases, splits=pg.splits)
        reducer = state["reducer"]
        parts = []
        for i in range(sl.start, sl.stop):  # one backward pass per item
            loss = _item_backward(
                model, prompts[i], targets[i], i, reducer, None if dis is None else dis[i]
            )
            sg, sgw = reducer.take()
            parts.append(
                _item_frame(
                    i, ids[i], float(loss.detach().cpu()), sg, sgw, member, g_numel, block_of,
                    pg.groups, numel, _moe_rows(pg, sg, sgw, reducer.slices, numel),
                )
            )  # fmt: skip
        df = pd.concat(parts, ignore_index=True)
        df.insert(0, "n_layers", model.n_layers)
        df.insert(0, "concept_set", concept_set)
        df.insert(0, "model", model.name)
        emit(_CELL_LAYER, df)

    peak = 0
    try:
        # a cell = one chunk of ``batch_size`` items at one pseudo-layer; no batch back-off
        # (items are one per pass already, a smaller chunk frees no memory)
        cells = sweep_cells(
            len(prompts), batch_size, [_CELL_LAYER], key_of, compute, cache,
            description="saliency", progress=progress, backoff=False, count="items",
        )  # fmt: skip
    finally:
        reducer = state.get("reducer")
        if reducer is not None:
            peak = reducer.peak
            reducer.remove()
            # offloaded weights are new meta tensors after every forward: restore by name
            for n, p in model.hf.named_parameters(remove_duplicate=False):
                p.grad = None
                p.requires_grad_(flags.get(n, False))
    frames = [_with_objective(df, objective) for df in cells]
    out = pd.concat(frames, ignore_index=True)
    out.attrs["peak_grad_bytes"] = int(peak)
    out.attrs["total_grad_bytes"] = int(sum(p.numel() * p.element_size() for p in pg.params))
    return out


_CELL_LAYER = 0  # saliency cells have no layer dimension: one pseudo-layer for sweep_cells


def _check_distractors(model, prompts, ids, distractors, objective) -> list[list[str]] | None:
    """The margin's distractors as lists (validated), or ``None`` for the NLL objective."""
    if objective not in OBJECTIVES:
        raise MedmapError(
            f"unknown saliency objective {objective!r}", hint=f"use one of {', '.join(OBJECTIVES)}"
        )
    if objective == "nll":
        return None
    if distractors is None:
        raise MedmapError(
            "saliency objective 'margin' needs distractors",
            hint="pass distractors=[[wrong answers of item 0], ...], or use objective='nll'",
        )
    if isinstance(distractors, str) or len(distractors) != len(prompts):
        raise MedmapError(f"{len(distractors)} distractor lists for {len(prompts)} prompts")
    dis = []
    for i, d in enumerate(distractors):
        if isinstance(d, str):
            raise MedmapError(
                f"the distractors of saliency item {ids[i]!r} are a string, not a list",
                hint=f"pass a list of wrong answers, e.g. [{d!r}]",
            )
        if not d:
            raise MedmapError(
                f"saliency item {ids[i]!r} has no distractors for the margin objective",
                hint="give every item at least one wrong answer (a list), or leave the items "
                "without any out of the margin run",
            )
        dis.append([str(x) for x in d])
        encode_targets(  # validate (empty or too long answers)
            model.tokenizer, [prompts[i]] * len(d), dis[-1], max_length=model.max_length
        )
    return dis


def _with_objective(df: pd.DataFrame, objective: str) -> pd.DataFrame:
    """``df`` with the ``objective`` column after ``n_layers`` (cells are stored without it, so
    NLL cells written before the margin existed resume as they are)."""
    if "objective" not in df.columns:
        df = df.copy()
        df.insert(int(df.columns.get_loc("n_layers")) + 1, "objective", objective)
    return df


def _item_backward(
    model,
    prompt: str,
    target: str,
    i: int,
    reducer: GradReducer,
    distractors: Sequence[str] | None = None,
) -> torch.Tensor:
    """Loss of item ``i`` and its backward pass (gradients go to ``reducer``): the NLL of
    ``target``, or with ``distractors`` minus its margin (:func:`margin_loss`).

    Items are always one per pass (per-item gradients), so there is no batch to shrink: out of
    memory becomes a one-line error naming the item.
    """
    answers = [target, *(distractors or ())]
    try:
        with torch.enable_grad():
            if distractors is None:
                loss = item_loss(model, prompt, target)
            else:
                loss = margin_loss(model, prompt, target, distractors)
            if not bool(torch.isfinite(loss)):
                _nonfinite_loss(model, prompt, answers, i)
            loss.backward()
        return loss.detach()
    except Exception as e:
        if not is_oom(e):
            raise
        kind = type(e).__name__
    reducer.take()  # drop partial sums; out of the except block so the failed graph is freed
    free_memory()
    raise MedmapError(
        f"out of memory ({kind}) in the backward pass of saliency item {i} "
        f"({len(answers)} sequences, {sum(len(prompt) + len(a) for a in answers)} characters)",
        hint="saliency keeps one item's activations and the weights: load the model in bfloat16 "
        "(--dtype bfloat16), shard it over devices (--device-map auto) or use shorter prompts",
    )


def _moe_rows(
    pg: ParamGroups, sg, sgw, slices, numel
) -> list[tuple[int, str, float, float, float]]:
    """``(layer, module, sum |g|, sum |g·w|, numel)`` of every expert and router of the model."""
    acc: dict[tuple[int, str], list[float]] = {}

    def add(layer, module, a, b, n):
        cur = acc.setdefault((layer, module), [0.0, 0.0, 0.0])
        cur[0] += a
        cur[1] += b
        cur[2] += n

    for k, layer, e, n_fused in pg.experts:
        if e is not None:
            add(layer, f"expert.{e}", sg[k], sgw[k], numel[k])
        elif n_fused:
            vg, vgw = slices.get(k, (np.zeros(n_fused), np.zeros(n_fused)))
            for j in range(n_fused):
                add(layer, f"expert.{j}", vg[j], vgw[j], numel[k] / n_fused)
    for k, layer in pg.routers:
        add(layer, "router", sg[k], sgw[k], numel[k])

    def order(key):
        layer, module = key
        return (layer, module == "router", int(module.split(".")[1]) if "." in module else 0)

    return [(layer, m, *acc[(layer, m)]) for layer, m in sorted(acc, key=order)]


def _item_frame(i, item_id, loss, sg, sgw, member, g_numel, block_of, groups, numel, extra=()):
    n_groups = len(groups)
    gs = np.bincount(member, weights=sg, minlength=n_groups)
    gws = np.bincount(member, weights=sgw, minlength=n_groups)
    layers = [g[0] for g in groups]
    modules = [g[1] for g in groups]
    sums_g, sums_gw, counts = list(gs), list(gws), list(g_numel)
    for b in sorted({x for x in block_of if x > 0}):
        sel = block_of == b
        layers.append(int(b))
        modules.append("block")
        sums_g.append(sg[sel].sum())
        sums_gw.append(sgw[sel].sum())
        counts.append(numel[sel].sum())
    for layer, module, a, b, cnt in extra:  # experts and routers (sub-parts of a block's mlp)
        layers.append(int(layer))
        modules.append(module)
        sums_g.append(a)
        sums_gw.append(b)
        counts.append(cnt)
    sums_g, sums_gw, counts = np.array(sums_g), np.array(sums_gw), np.array(counts)
    tot_g, tot_gw = sg.sum(), sgw.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        df = pd.DataFrame(
            {
                "item": i,
                "item_id": item_id,
                "loss": loss,
                "layer": layers,
                "module": modules,
                "numel": counts.astype(np.int64),
                "grad_abs_sum": sums_g,
                "grad_x_weight_sum": sums_gw,
                "grad_abs_mean": sums_g / counts,
                "grad_x_weight_mean": sums_gw / counts,
                "grad_abs_share": sums_g / tot_g if tot_g > 0 else np.nan,
                "grad_x_weight_share": sums_gw / tot_gw if tot_gw > 0 else np.nan,
            }
        )
    return df


def saliency_summary(df: pd.DataFrame, *, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Tidy rows from :func:`saliency_items`: mean over items with a bootstrap CI per part.

    Technique ``saliency``; metrics :data:`METRICS`; extra columns ``module`` and ``objective``
    (``"nll"`` or ``"margin"``: never pooled; a frame without the column is NLL, as before the
    margin existed); ``layer`` = block index + 1 for block parts, 0 for the embedding, -1 for
    final norm / unembedding / other (their ``relative_depth`` is NaN).
    """
    if "objective" not in df.columns:
        df = df.assign(objective="nll")
    rows = []
    for (model, cset, n_layers, objective, layer, module), g in df.groupby(
        ["model", "concept_set", "n_layers", "objective", "layer", "module"], sort=False
    ):
        for metric in METRICS:
            est, lo, hi, cnt = mean_ci(g[metric].to_numpy(), n_boot=n_boot, seed=seed)
            rows.append(
                {
                    "model": model,
                    "layer": int(layer),
                    "relative_depth": relative_depth(int(layer), int(n_layers)),
                    "concept_set": cset,
                    "technique": "saliency",
                    "metric": metric,
                    "value": est,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n": cnt,
                    "seed": seed,
                    "module": module,
                    "objective": objective,
                }
            )
    return make_rows(rows)


def weight_saliency(
    model: MedmapModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    concept_set: str = "custom",
    batch_size: int = 8,
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
    distractors: Sequence[Sequence[str]] | None = None,
    objective: str = "nll",
) -> pd.DataFrame:
    """Weight-gradient saliency of the target completions as tidy rows (see module docstring).

    Per-item values come from :func:`saliency_items` (``objective``, ``distractors``: see
    there); this aggregates them with :func:`saliency_summary` (mean over items,
    percentile-bootstrap CI, ``n_boot`` resamples).
    """
    items = saliency_items(
        model,
        prompts,
        targets,
        concept_set=concept_set,
        batch_size=batch_size,
        progress=progress,
        cache_dir=cache_dir,
        distractors=distractors,
        objective=objective,
    )
    out = saliency_summary(items, n_boot=n_boot, seed=seed)
    out.attrs.update(items.attrs)
    return out


def saliency_specificity(
    medical: pd.DataFrame,
    control: pd.DataFrame,
    *,
    metric: str = "grad_x_weight_share",
    module: str = "block",
    kind: str = "difference",
    n_boot: int = 200,
    seed: int = 0,
    objective: str | None = None,
) -> pd.DataFrame:
    """Medical minus control saliency per layer, from two :func:`saliency_items` frames.

    Metric ``specificity_<metric>`` (label = ``kind``, concept_set ``<medical>-vs-<control>``),
    two-sample bootstrap CI over items. ``kind="ratio"`` gives medical / control instead.
    ``objective``: the rows compared (``"nll"`` / ``"margin"``); ``None`` needs frames of one
    objective each (a frame without the column is NLL), never pooled.
    """
    medical = _one_objective(medical, objective)
    control = _one_objective(control, objective)
    m = medical[medical["module"] == module]
    c = control[control["module"] == module]
    rows = []
    for layer, g in m.groupby("layer", sort=True):
        cg = c[c["layer"] == layer]
        if cg.empty:
            continue
        rows.append(
            specificity_row(
                g, cg, layer=layer, technique="saliency", metric=metric, kind=kind,
                n_boot=n_boot, seed=seed, module=module,
            )
        )  # fmt: skip
    return make_rows(rows)


def _one_objective(df: pd.DataFrame, objective: str | None) -> pd.DataFrame:
    col = df["objective"] if "objective" in df.columns else pd.Series("nll", index=df.index)
    if objective is None:
        seen = sorted(set(col))
        if len(seen) > 1:
            raise MedmapError(
                f"saliency rows of several objectives ({', '.join(seen)}) would be pooled",
                hint="pass objective='nll' or objective='margin'",
            )
        return df
    return df[col == objective]


def weight_saliency_concepts(
    model: MedmapModel,
    cs=None,
    *,
    prompts: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    item_ids: Sequence[str] | None = None,
    concept_set: str | None = None,
    max_items: int | None = None,
    batch_size: int = 8,
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """:func:`weight_saliency` (NLL objective) over a concept set's targets or plain strings.

    Args:
        cs: a concept set (a :class:`~medmap.concepts.ConceptSet`, a bundled name or a
            ``.yaml``/``.csv`` path): every target, scored with its first accepted answer;
            ``max_items`` takes a stratified, seeded subset (``ConceptSet.subset``).
        prompts / targets: instead of ``cs``, the plain strings :func:`saliency_items` takes
            (item ``i``: the NLL of ``targets[i]`` after ``prompts[i]``); ``max_items`` keeps
            the first items; ``item_ids`` label them (default: the index).
        concept_set: the ``concept_set`` column (default: the set's name, or ``"custom"``).
        batch_size, progress, cache_dir: as in :func:`saliency_items`; ``n_boot`` / ``seed``:
            the CIs (and the subset).

    Returns:
        :func:`saliency_summary` rows (the :mod:`medmap.analysis.results` columns plus
        ``module`` and ``objective``), the same shape for a concept set and for plain strings;
        ``attrs`` as :func:`saliency_items`.
    """
    ct, name = plain_or_concepts(
        cs, prompts=prompts, targets=targets, item_ids=item_ids, concept_set=concept_set,
        max_items=max_items, seed=seed, technique="saliency",
    )  # fmt: skip
    items = saliency_items(
        model,
        ct.prompts,
        ct.targets,
        concept_set=name,
        item_ids=ct.ids,
        batch_size=batch_size,
        progress=progress,
        cache_dir=cache_dir,
    )
    out = saliency_summary(items, n_boot=n_boot, seed=seed)
    out.attrs.update(items.attrs)
    return out


class SaliencyTechnique(Technique):
    """Weight saliency through the technique interface (:mod:`medmap.techniques.base`).

    The set is :meth:`RunContext.causal_set` (known targets only with ``known_only``);
    ``saliency_items`` keeps its first items (gradients cost one backward pass per item). Each
    target is scored with the knows stage's best accepted answer (:meth:`RunContext.choices`),
    once per objective of ``saliency_objectives``: ``"nll"`` its NLL, ``"margin"`` minus its
    margin against the same distractors as the knows stage (targets without distractors are
    left out of the margin; a set where none has any gets NLL rows only, with a note).
    """

    name = "saliency"
    title = "saliency runs"
    map_rows = ("saliency",)

    def run_cell(self, model: MedmapModel, cell: Cell, ctx: RunContext) -> pd.DataFrame:
        from medmap.analysis.results import COLUMNS

        cfg = ctx.config
        cs = ctx.causal_set(cell.concept_set, self)
        if cs is None:  # too few known facts: the knows rows say so
            return pd.DataFrame(columns=COLUMNS)
        ct = concept_targets(cs, cfg.saliency_items)
        choices = ctx.choices(cell.concept_set)
        picked = [choices[i] for i in ct.ids]
        answers = [c.accepted[0] for c in picked]
        common = dict(
            concept_set=set_name(cs),
            batch_size=cfg.batch_size,
            progress=ctx.progress,
            cache_dir=ctx.run.cells_dir(self.name, cell.key),
        )
        frames = []
        for objective in cfg.saliency_objectives:
            if objective == "nll":
                frames.append(saliency_items(model, ct.prompts, answers, item_ids=ct.ids, **common))
                continue
            keep = [k for k, c in enumerate(picked) if c.distractors]
            if not keep:
                ctx.note(f"saliency margin skipped for {cs.name}: no target has distractors")
                continue
            frames.append(
                saliency_items(
                    model,
                    [ct.prompts[k] for k in keep],
                    [answers[k] for k in keep],
                    item_ids=[ct.ids[k] for k in keep],
                    distractors=[picked[k].distractors for k in keep],
                    objective="margin",
                    **common,
                )
            )
        if not frames:
            return pd.DataFrame(columns=COLUMNS)
        items = pd.concat(frames, ignore_index=True)
        ctx.keep_items(self.name, cell, items)
        from medmap.techniques.summary import split_half_rows

        blocks = items[items["module"] == "block"]
        stab = split_half_rows(
            blocks, value="grad_x_weight_share", map_name="saliency", by=("objective",),
            seed=cfg.seed,
        )  # fmt: skip
        return pd.concat(
            [saliency_summary(items, n_boot=cfg.n_boot, seed=cfg.seed), make_rows(stab)],
            ignore_index=True,
        )
