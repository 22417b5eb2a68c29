"""Surface-form baseline of the representation probes (docs/detectors.md, "Surface baseline").

When every item's concept starts with a written amount ("15 g of paracetamol", detected with
:func:`medmap.concepts.surface.has_amounts`, whatever the set is called), a probe could read a
label from the string's shape (number of digits, characters, tokens) instead of its meaning.
For every ordered label (an ordinal label with a declared level ``order``, such as
``dose_level``: docs/concept-format.md, "Numbers in concepts") this module gives:

* one whole-model score (layer -1) ``surface_probe_acc``: the best single-feature surface probe
  (:func:`medmap.concepts.surface.surface_baseline`, maximum over ``digits``, ``chars``,
  ``tokens`` with the model's tokenizer, and their joint ``shape``), on the same items the
  activation probe scores; ``baseline`` = 95th percentile of that maximum under permuted labels;
  also ``surface_probe_acc_by_feature``, one score per feature with its own null;
* a :class:`SurfacePlan` whose surface-matched subset (balanced on the joint of all features,
  so no surface feature carries information about the label; where that leaves fewer than
  :data:`MIN_MATCHED_PER_LABEL` items of a level, on the joint of fewer features, the others
  checked at their null on it: :func:`medmap.concepts.surface.matched_on`) is probed at every layer by
  :func:`matched_scores`: ``probe_acc_surface_matched`` (the ``probe_acc`` probe, logistic
  regression on the levels as classes) and ``probe_r2_surface_matched`` /
  ``probe_spearman_surface_matched`` (the ridge probe of the label's own ``probe_r2`` /
  ``probe_spearman`` rows), each with its shuffled-label baseline on the subset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medmap.concepts.surface import (
    has_amounts,
    matched_on,
    surface_baseline,
    surface_features,
)
from medmap.techniques.representation.scores import (
    Score,
    clean_ordinal,
    ordinal_scores,
    probe_accuracy_score,
)

if TYPE_CHECKING:  # pragma: no cover
    from medmap.techniques.representation.api import ItemInfo, Label

MIN_MATCHED_PER_LABEL = 4  # items of every label in the matched subset to probe it
SHAPE = "shape"  # name of the joint feature (digits, chars[, tokens]) the subset is matched on


@dataclass
class SurfacePlan:
    """A label's surface-matched subset, probed at every layer.

    Attributes:
        label: the label.
        keep: ``(n_items,)`` bool, the items the label's own probe scores.
        matched: sorted indices into the kept items (the matched subset), or ``None`` when no
            subset has :data:`MIN_MATCHED_PER_LABEL` items of every level.
        feature: what the subset is balanced on (``"digits+chars+tokens"``; ``""`` if none).
    """

    label: Label
    keep: np.ndarray
    matched: np.ndarray | None
    feature: str


def surface_labels(info: ItemInfo) -> list[Label]:
    """The labels a surface baseline is computed for: ordinal ones with declared levels."""
    return [lab for lab in info.labels if lab.kind == "ordinal" and lab.levels]


def plan_surface(
    info: ItemInfo, *, tokenizer: Any = None, seed: int = 0, n_perm: int = 200
) -> tuple[list[tuple[str, Score, str]], list[SurfacePlan], list[str]]:
    """Surface baselines of an item set (nothing unless every concept has a written amount).

    Returns ``(scores, plans, skipped)``: ``scores`` holds ``(label, Score, feature)``, per
    label first ``surface_probe_acc`` (the best feature's accuracy; ``baseline`` = null of the
    maximum over features) then one ``surface_probe_acc_by_feature`` per feature (``baseline``
    = that feature's own null); CIs NaN, nulls from ``n_perm`` permutations with ``seed``.
    ``plans``: one :class:`SurfacePlan` per label; ``skipped``: the labels without a matched
    subset large enough to probe.
    """
    if not has_amounts(info.concepts):
        return [], [], []
    feats = surface_features(info.concepts, tokenizer)
    scores, plans, skipped = [], [], []
    nan = float("nan")
    for lab in surface_labels(info):
        cleaned = clean_ordinal(lab.values)
        if cleaned is None:
            continue
        keep = cleaned[0]
        where = np.flatnonzero(keep)
        vals = [str(lab.raw[i]) for i in where]  # level names, as the concept audit uses
        fk = {name: [v[i] for i in where] for name, v in feats.items()}
        base = surface_baseline(fk, vals, n_perm=n_perm, seed=seed)
        sc = Score("surface_probe_acc", base.accuracy, nan, nan, base.null, base.n, "probe")
        scores.append((lab.name, sc, base.feature))
        for name, acc in base.accuracies.items():
            by = Score(
                "surface_probe_acc_by_feature", acc, nan, nan, base.nulls[name], base.n, "probe"
            )
            scores.append((lab.name, by, name))
        singles = {k: v for k, v in fk.items() if k != SHAPE}
        got = matched_on(
            singles, vals, min_per_label=MIN_MATCHED_PER_LABEL, n_perm=n_perm, seed=seed
        )
        if got is None:
            skipped.append(lab.name)
            plans.append(SurfacePlan(lab, keep, None, ""))
            continue
        on, sub = got
        plans.append(SurfacePlan(lab, keep, np.asarray(sub, dtype=np.int64), "+".join(on)))
    return scores, plans, skipped


def matched_scores(
    z: np.ndarray,
    plan: SurfacePlan,
    *,
    rng: np.random.Generator,
    seed: int,
    n_boot: int,
    n_perm_probe: int,
) -> list[Score]:
    """The layer's probes on the plan's matched subset (``[]`` when it was skipped).

    ``z`` ``(n_items, k)``: the layer's analysis space (the same features the probes use).
    """
    if plan.matched is None:
        return []
    zk = z[plan.keep][plan.matched]
    vals = np.asarray(plan.label.values, dtype=object)[plan.keep][plan.matched]
    codes = np.unique(vals.astype(str), return_inverse=True)[1]
    acc = probe_accuracy_score(
        zk,
        codes,
        rng=rng,
        seed=seed,
        n_boot=n_boot,
        n_perm_probe=n_perm_probe,
        metric="probe_acc_surface_matched",
    )
    ords, _ = ordinal_scores(
        zk, vals.astype(float), rng=rng, seed=seed, n_boot=n_boot, n_perm_probe=n_perm_probe
    )
    for s in ords:
        s.metric = f"{s.metric}_surface_matched"
    return [acc, *ords]
