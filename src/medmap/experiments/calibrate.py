"""Planted-fact calibration: can a technique find the block a fact was written into?

Fictional facts (invented drug → indication, :file:`planted_facts.yaml`) are written into one
chosen block at a time by training only that block's MLP (Adam, ``steps`` steps, cross-entropy of
the answer after the *training* paraphrases). The edit is checked on *held-out* paraphrases by
forced choice against the other planted facts' answers, and its collateral on real facts of a
control set (``knows`` margins before / after). Every technique is then run on the held-out
prompts of the edited model, and once on the unedited model (the null).

Per (technique, site, fact) a profile over blocks ``0..L-1``:

* ``lesion``: ``delta_nll`` of the answer when block ``b``'s site is removed (mean over the
  fact's held-out prompts);
* ``saliency``: ``grad_x_weight_share`` of block ``b``'s site (``mlp`` or whole ``block``);
* ``patching``: the logit difference (clean − corrupt answer's first token, nats) restored,
  ``LD_patched − LD_corrupt``, when block ``b``'s MLP output (``mlp``) is patched from a prompt
  of the fact into the same paraphrase of another planted fact of equal token length (not the
  normalised ``restored``: on the unedited model the clean/corrupt gap is ~0 and the ratio
  explodes); for ``block`` (the residual stream) its *increase* from before to after block
  ``b``, since a residual-patching profile is a step that stays up after the block that adds
  the fact.

``found_block`` = argmax over blocks of (edited − unedited profile): the peak relative to the
technique's null on the same prompts; ``raw_block`` = argmax of the edited profile alone;
``control_block`` = argmax of the unedited profile (negative control: no fact planted, so any
agreement with the planted block is chance or a generic bias, e.g. pitfall 10's first block).
``error_blocks`` = found − planted. The summary gives the ±1-block accuracy and mean absolute
error per technique and site with percentile-bootstrap CIs over rows (facts × planted blocks),
``n``, and as ``baseline`` the ±1 accuracy (or MAE) of a uniformly random block.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from medmap.analysis.results import make_rows
from medmap.analysis.stats import bootstrap_ci
from medmap.errors import MedmapError
from medmap.experiments.scoring import (
    answer_logprobs,
    choice_margins,
    mlp_params,
    restored,
    train_params,
)

TECHNIQUES = ("lesion", "saliency", "patching")
SITES = ("mlp", "block")


@dataclass(frozen=True)
class PlantedFact:
    """One fictional fact: ``drug`` → ``answer`` (with a leading space), with its prompts."""

    drug: str
    answer: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]


def load_planted_facts(
    n: int, *, seed: int = 0, path: str | Path | None = None
) -> list[PlantedFact]:
    """``n`` fictional facts (a seeded sample of the bundled file, or of ``path``)."""
    if path is None:
        text = resources.files("medmap.experiments").joinpath("planted_facts.yaml").read_text()
    else:
        text = Path(path).read_text()
    data = yaml.safe_load(text)
    facts = data["facts"]
    if not 2 <= n <= len(facts):
        raise MedmapError(
            f"--facts {n} is out of range", hint=f"use 2..{len(facts)} (forced choice needs 2)"
        )
    order = list(range(len(facts)))
    random.Random(seed).shuffle(order)
    out = []
    for i in sorted(order[:n]):
        f = facts[i]
        out.append(
            PlantedFact(
                f["drug"],
                f["answer"],
                tuple(t.format(drug=f["drug"]) for t in data["train"]),
                tuple(t.format(drug=f["drug"]) for t in data["heldout"]),
            )
        )
    return out


def _flat(facts: Sequence[PlantedFact], which: str) -> tuple[list[str], list[str], list[int]]:
    prompts, answers, owner = [], [], []
    for i, f in enumerate(facts):
        for p in getattr(f, which):
            prompts.append(p)
            answers.append(f.answer)
            owner.append(i)
    return prompts, answers, owner


def fact_margins(model, facts: Sequence[PlantedFact], which: str = "heldout") -> np.ndarray:
    """Per fact, the mean forced-choice margin (nats) over its ``which`` prompts, against the
    other facts' answers. ``> 0`` on average = the model prefers the planted answer."""
    prompts, answers, owner = _flat(facts, which)
    pools = [[g.answer for g in facts if g.answer != a] for a in answers]
    m = choice_margins(model, prompts, answers, pools)
    owner = np.array(owner)
    return np.array([m[owner == i].mean() for i in range(len(facts))])


def fact_known(model, facts: Sequence[PlantedFact], which: str = "heldout") -> np.ndarray:
    """Per fact, the fraction of its ``which`` prompts on which the planted answer wins."""
    prompts, answers, owner = _flat(facts, which)
    pools = [[g.answer for g in facts if g.answer != a] for a in answers]
    m = choice_margins(model, prompts, answers, pools) > 0
    owner = np.array(owner)
    return np.array([m[owner == i].mean() for i in range(len(facts))])


def plant(
    model,
    facts: Sequence[PlantedFact],
    block: int,
    *,
    steps: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    part: str = "mlp",
) -> list[float]:
    """Write ``facts`` into block ``block`` in place by training only its MLP (``part="mlp"``)
    on the training paraphrases; returns the loss (mean answer NLL, nats) per step.

    The caller owns undoing it: wrap in :func:`medmap.experiments.scoring.restored`.
    """
    prompts, answers, _ = _flat(facts, "train")

    def loss() -> torch.Tensor:
        return -answer_logprobs(model, prompts, answers, batch_size=len(prompts)).mean()

    return train_params(
        model, mlp_params(model, [block], part), loss, steps=steps, lr=lr, seed=seed
    )


# --------------------------------------------------------------------------- profiles


def _patch_pairs(model, facts: Sequence[PlantedFact]) -> list[tuple[int, int, int]]:
    """(fact, partner, template) with equal prompt token length; partner = the next such fact."""
    tok = model.tokenizer
    n_t = len(facts[0].heldout)
    lens = [[len(tok(f.heldout[t])["input_ids"]) for t in range(n_t)] for f in facts]
    out = []
    for t in range(n_t):
        for i in range(len(facts)):
            for step in range(1, len(facts)):
                j = (i + step) % len(facts)
                if lens[j][t] == lens[i][t] and facts[j].answer != facts[i].answer:
                    out.append((i, j, t))
                    break
    return out


def profiles(
    model,
    facts: Sequence[PlantedFact],
    techniques: Sequence[str] = TECHNIQUES,
    sites: Sequence[str] = SITES,
    *,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Rows ``technique, site, fact, block, value`` (one per block ``0..L-1``; see module doc)."""
    from medmap.techniques.lesioning import lesion
    from medmap.techniques.patching import patch
    from medmap.techniques.saliency import saliency_items

    n = model.n_layers
    prompts, answers, owner = _flat(facts, "heldout")
    owner = np.array(owner)
    frames = []

    def add(technique: str, site: str, df: pd.DataFrame) -> None:
        df = df.groupby(["fact", "block"], as_index=False)["value"].mean()
        frames.append(df.assign(technique=technique, site=site))

    if "lesion" in techniques:
        for site in sites:
            d = lesion(model, prompts, answers, batch_size=batch_size, site=site)
            add("lesion", site, pd.DataFrame(
                {"fact": owner[d["item"].to_numpy()], "block": d["block"], "value": d["delta_nll"]}
            ))  # fmt: skip
    if "saliency" in techniques:
        d = saliency_items(model, prompts, answers, batch_size=batch_size)
        d = d[(d["layer"] >= 1) & (d["layer"] <= n)]
        for site in sites:
            g = d[d["module"] == site]
            add("saliency", site, pd.DataFrame(
                {"fact": owner[g["item"].to_numpy()], "block": g["layer"] - 1,
                 "value": g["grad_x_weight_share"]}
            ))  # fmt: skip
    if "patching" in techniques:
        pairs = _patch_pairs(model, facts)
        if pairs:
            clean = [facts[i].heldout[t] for i, _, t in pairs]
            corrupt = [facts[j].heldout[t] for _, j, t in pairs]
            ct = [facts[i].answer for i, _, _ in pairs]
            rt = [facts[j].answer for _, j, _ in pairs]
            who = np.array([i for i, _, _ in pairs])
            for site in sites:
                d = patch(model, clean, corrupt, ct, rt, batch_size=batch_size, site=site)
                v = (d["logit_diff_patched"] - d["logit_diff_corrupt"]).to_numpy(dtype=float)
                layer = d["layer"].to_numpy()
                df = pd.DataFrame({"fact": who[d["pair"].to_numpy()], "layer": layer, "value": v})
                if site == "block":  # residual index l = after block l-1: the step it adds
                    df = df.sort_values(["fact", "layer"], kind="stable")
                    df = df.groupby(["fact", "layer"], as_index=False)["value"].mean()
                    df["value"] = df.groupby("fact")["value"].diff()
                    df = df.dropna(subset=["value"])
                df["block"] = df["layer"] - 1
                add("patching", site, df[["fact", "block", "value"]])
    if not frames:
        raise MedmapError("no technique produced a profile", hint=f"use {', '.join(TECHNIQUES)}")
    out = pd.concat(frames, ignore_index=True)
    out["block"] = out["block"].astype(int)
    return out[["technique", "site", "fact", "block", "value"]]


def _argmax_block(g: pd.DataFrame, col: str) -> int:
    g = g.sort_values("block", kind="stable")
    v = g[col].to_numpy(dtype=float)
    v = np.where(np.isfinite(v), v, -np.inf)
    return int(g["block"].iloc[int(np.argmax(v))])


def localise(edited: pd.DataFrame, null: pd.DataFrame, planted_block: int) -> pd.DataFrame:
    """Per (technique, site, fact): ``found_block`` (null-subtracted peak), ``raw_block``,
    ``control_block`` and their errors relative to ``planted_block`` (see module doc)."""
    m = edited.merge(
        null, on=["technique", "site", "fact", "block"], suffixes=("", "_null"), how="left"
    )
    m["value_null"] = m["value_null"].fillna(0.0)
    m["diff"] = m["value"] - m["value_null"]
    rows = []
    for (tech, site, fact), g in m.groupby(["technique", "site", "fact"], sort=True):
        found = _argmax_block(g, "diff")
        raw = _argmax_block(g, "value")
        ctrl = _argmax_block(g, "value_null")
        peak = g.loc[g["block"] == found, "diff"].iloc[0]
        rows.append(
            {
                "technique": tech,
                "site": site,
                "planted_block": planted_block,
                "fact": int(fact),
                "found_block": found,
                "error_blocks": found - planted_block,
                "peak_value": float(peak),
                "raw_block": raw,
                "raw_error_blocks": raw - planted_block,
                "control_block": ctrl,
                "control_error_blocks": ctrl - planted_block,
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- summary


def _chance(planted: np.ndarray, n_layers: int, tol: int = 1) -> tuple[float, float]:
    """±``tol`` accuracy and mean absolute error of a uniformly random block."""
    blocks = np.arange(n_layers)
    acc = np.mean([np.mean(np.abs(blocks - p) <= tol) for p in planted])
    mae = np.mean([np.mean(np.abs(blocks - p)) for p in planted])
    return float(acc), float(mae)


def calibration_summary(
    table: pd.DataFrame, *, n_layers: int, model_name: str, n_boot: int = 1000, seed: int = 0,
    learned_only: bool = True,
) -> pd.DataFrame:  # fmt: skip
    """Tidy rows (:data:`medmap.analysis.results.COLUMNS`, ``layer = -1``) per technique and
    site: metric ``accuracy_pm1`` and ``mae_blocks``, label ``null_subtracted`` (the found
    block), ``raw`` (edited profile's peak) or ``unedited_control`` (the negative control);
    CIs bootstrap the rows (facts × planted blocks); ``baseline`` = a random block's value.
    ``learned_only``: use only facts the edit taught (held-out forced choice won on average)."""
    t = table[table["learned"]] if learned_only and "learned" in table else table
    rows = []
    for (tech, site), g in t.groupby(["technique", "site"], sort=True):
        acc0, mae0 = _chance(g["planted_block"].to_numpy(), n_layers)
        for label, col in (
            ("null_subtracted", "error_blocks"),
            ("raw", "raw_error_blocks"),
            ("unedited_control", "control_error_blocks"),
        ):
            err = np.abs(g[col].to_numpy(dtype=float))
            for metric, vals, base in (
                ("accuracy_pm1", (err <= 1).astype(float), acc0),
                ("mae_blocks", err, mae0),
            ):
                est, lo, hi = bootstrap_ci(vals, n_boot=n_boot, seed=seed)
                rows.append(
                    {
                        "model": model_name,
                        "layer": -1,
                        "relative_depth": float("nan"),
                        "concept_set": "planted_facts",
                        "technique": f"calibration_{tech}",
                        "metric": metric,
                        "label": label,
                        "value": est,
                        "ci_low": lo,
                        "ci_high": hi,
                        "baseline": base,
                        "n": len(vals),
                        "seed": seed,
                        "site": site,
                    }
                )
    return make_rows(rows) if rows else make_rows([{"model": model_name, "value": np.nan}])


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class CalibrateConfig:
    """Settings of one calibration run (defaults: SmolLM2-135M on 2 CPU cores, < 20 min)."""

    blocks: tuple[int, ...]
    n_facts: int = 8
    steps: int = 20
    lr: float = 1e-3
    part: str = "mlp"
    techniques: tuple[str, ...] = TECHNIQUES
    sites: tuple[str, ...] = SITES
    control_set: str | None = "countries"
    control_items: int = 16
    seed: int = 0
    batch_size: int = 8
    n_boot: int = 1000

    def key(self, model_name: str) -> str:
        blob = json.dumps({"model": model_name, **asdict(self)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_config(model, cfg: CalibrateConfig) -> None:
    n = model.n_layers
    if not cfg.blocks:
        raise MedmapError("no blocks to plant into", hint="pass --blocks, e.g. 6,12,18,24")
    bad = [b for b in cfg.blocks if not 0 <= b < n]
    if bad:
        raise MedmapError(
            f"block {bad[0]} is out of range for {model.name}", hint=f"use blocks 0..{n - 1}"
        )
    for t in cfg.techniques:
        if t not in TECHNIQUES:
            raise MedmapError(f"unknown technique {t!r}", hint=f"use {', '.join(TECHNIQUES)}")
    for s in cfg.sites:
        if s not in SITES:
            raise MedmapError(f"unknown site {s!r}", hint=f"use {', '.join(SITES)}")
    if cfg.steps < 1 or cfg.lr <= 0:
        raise MedmapError("steps must be >= 1 and lr > 0")


def _control_margins(model, cfg: CalibrateConfig) -> np.ndarray | None:
    if not cfg.control_set:
        return None
    from medmap.techniques.knowledge import knows

    df = knows(model, cfg.control_set, max_items=cfg.control_items, seed=cfg.seed)
    return df["margin"].to_numpy(dtype=float)


def calibrate(model, cfg: CalibrateConfig, out: str | Path | None = None, *, progress=None):
    """Run the planted-fact calibration; returns ``(table, summary, checks, profiles)``.

    ``table``: one row per (technique, site, planted_block, fact) (see :func:`localise`, plus
    ``model, drug, answer, learned, margin_before, margin_after, n_layers, seed``);
    ``summary``: :func:`calibration_summary`; ``checks``: one row per planted block (edit
    loss, held-out fraction learned, control-set margin change); ``profiles``: every profile
    (``planted_block`` -1 = unedited). With ``out``, each planted block's results are written
    to ``out/cells/`` as they finish (a rerun with the same settings reuses them) and the
    tables to ``out/calibration*.parquet``. The model's weights are restored after each edit.
    """
    from medmap.run.outputs import write_parquet_atomic

    _check_config(model, cfg)
    say = progress or (lambda msg: None)
    facts = load_planted_facts(cfg.n_facts, seed=cfg.seed)
    key = cfg.key(model.name)
    cells = Path(out) / "cells" if out is not None else None

    def cached(name: str, compute):
        if cells is None:
            return compute()
        path = cells / f"{name}-{key}.parquet"
        if path.exists():
            return pd.read_parquet(path)
        df = compute()
        cells.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(df, path)
        return df

    techs, sites = list(cfg.techniques), list(cfg.sites)
    say("unedited model: profiles and margins")
    null = cached(
        "null",
        lambda: profiles(model, facts, techs, sites, batch_size=cfg.batch_size).assign(
            planted_block=-1
        ),
    )
    base_margin = fact_margins(model, facts)
    ctrl_before = _control_margins(model, cfg)
    tables, checks, profs = [], [], [null]
    for b in cfg.blocks:
        say(f"planting {len(facts)} facts into block {b}")

        def run_block(b=b):
            with restored(mlp_params(model, [b], cfg.part)):
                losses = plant(
                    model, facts, b, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, part=cfg.part
                )
                after = fact_margins(model, facts)
                train_after = fact_margins(model, facts, "train")
                ctrl_after = _control_margins(model, cfg)
                prof = profiles(model, facts, techs, sites, batch_size=cfg.batch_size)
            loc = localise(prof, null.drop(columns="planted_block"), b)
            loc["margin_before"] = base_margin[loc["fact"]]
            loc["margin_after"] = after[loc["fact"]]
            loc["learned"] = loc["margin_after"] > 0
            dctrl = (
                float(np.nanmean(ctrl_after - ctrl_before)) if ctrl_before is not None else np.nan
            )
            chk = pd.DataFrame(
                [
                    {
                        "planted_block": b,
                        "loss_first": losses[0],
                        "loss_last": losses[-1],
                        "heldout_learned": float(np.mean(after > 0)),
                        "heldout_margin": float(np.mean(after)),
                        "train_margin": float(np.mean(train_after)),
                        "margin_before": float(np.mean(base_margin)),
                        "control_set": cfg.control_set or "",
                        "control_margin_change": dctrl,
                        "control_margin_abs_change": float(
                            np.nanmean(np.abs(ctrl_after - ctrl_before))
                        )
                        if ctrl_before is not None
                        else np.nan,
                        "n_facts": len(facts),
                    }
                ]
            )
            # one cell file per block holds all three frames, tagged by a "part" column
            return pd.concat(
                [
                    loc.assign(frame="table"),
                    chk.assign(frame="check"),
                    prof.assign(planted_block=b, frame="profile"),
                ],
                ignore_index=True,
            )

        cell = cached(f"block{b}", run_block)
        tables.append(cell[cell["frame"] == "table"].dropna(axis=1, how="all"))
        checks.append(cell[cell["frame"] == "check"].dropna(axis=1, how="all"))
        profs.append(cell[cell["frame"] == "profile"].dropna(axis=1, how="all"))
    table = pd.concat(tables, ignore_index=True).drop(columns="frame")
    for c in ("fact", "planted_block", "found_block", "error_blocks", "raw_block",
              "raw_error_blocks", "control_block", "control_error_blocks"):  # fmt: skip
        table[c] = table[c].astype(int)
    table["learned"] = table["learned"].astype(bool)
    table.insert(0, "model", model.name)
    table["drug"] = [facts[i].drug for i in table["fact"]]
    table["answer"] = [facts[i].answer for i in table["fact"]]
    table["n_layers"] = model.n_layers
    table["seed"] = cfg.seed
    checks_df = pd.concat(checks, ignore_index=True).drop(columns="frame")
    checks_df.insert(0, "model", model.name)
    prof_df = pd.concat(profs, ignore_index=True).drop(columns="frame", errors="ignore")
    for c in ("planted_block", "fact", "block"):
        prof_df[c] = prof_df[c].astype(int)
    summary = calibration_summary(
        table, n_layers=model.n_layers, model_name=model.name, n_boot=cfg.n_boot, seed=cfg.seed
    )
    if out is not None:
        o = Path(out)
        write_parquet_atomic(table, o / "calibration.parquet")
        write_parquet_atomic(summary, o / "calibration_summary.parquet")
        write_parquet_atomic(checks_df, o / "calibration_checks.parquet")
        write_parquet_atomic(prof_df, o / "calibration_profiles.parquet")
    return table, summary, checks_df, prof_df
