"""Surface-form baselines: how well a label is read from the concept string's shape alone.

A probe on activations can decode a label from the concept's length rather than its meaning
(an overdose written "15000 mg" has more digits than a sub-therapeutic "2 mg"). These helpers
measure that shortcut so a probe result can be compared with it:

* :func:`dose_surface_features`: per item, the number of digits, the number of characters and
  (given a tokenizer) the number of tokens of the amount written in the concept ("1.5 g").
* :func:`surface_probe_accuracy`: cross-validated accuracy of the strongest probe that sees
  one surface feature only: the majority label of each feature value in the training folds
  (for a single categorical feature this is the Bayes-optimal rule; a one-hot logistic
  regression cannot beat it by more than noise).
* :func:`permutation_null`: the same accuracy under permuted labels (its 95th percentile is
  the "not above chance" threshold).
* :func:`surface_matched_subset`: items such that every feature value holds the same number of
  items of each label, so on the subset the feature carries no information about the label.
* :func:`matched_on`: the matched subset on the joint of as many features as the items allow,
  the others checked at their null on it.
* :func:`has_amounts`, :func:`surface_features` and :func:`surface_baseline`: what the
  representation technique uses for its ``surface_probe_acc`` row (layer -1) and its
  ``probe_*_surface_matched`` rows (docs/detectors.md, "Surface baseline").
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

_AMOUNT = re.compile(r"^(\d+(?:\.\d+)?) (\S+) of ")
# unit as written -> milligrams per unit
UNIT_MG = {"g": 1000.0, "mg": 1.0, "µg": 1e-3}


def parse_amount(concept: str) -> tuple[str, str]:
    """``"1.5 g of lithium"`` -> ``("1.5", "g")``; raises ValueError if it has no amount."""
    m = _AMOUNT.match(concept)
    if not m:
        raise ValueError(f"concept {concept!r} does not start with '<number> <unit> of '")
    return m.group(1), m.group(2)


def amount_mg(concept: str) -> float:
    """The amount of a dose concept converted to milligrams (``"250 µg of x"`` -> 0.25)."""
    number, unit = parse_amount(concept)
    if unit not in UNIT_MG:
        raise ValueError(f"unknown unit {unit!r} in {concept!r} (known: {', '.join(UNIT_MG)})")
    return float(number) * UNIT_MG[unit]


def dose_surface_features(concepts: Sequence[str], tokenizer: Any = None) -> dict[str, list[int]]:
    """Per concept, surface features of its written amount ``"<number> <unit>"``.

    Returns ``{"digits": [...], "chars": [...]}`` and, with a Hugging Face tokenizer,
    ``"tokens"``: the tokens of ``" <number> <unit>"`` as it follows a word in a sentence.
    """
    out: dict[str, list[int]] = {"digits": [], "chars": []}
    if tokenizer is not None:
        out["tokens"] = []
    for c in concepts:
        number, unit = parse_amount(c)
        dose = f"{number} {unit}"
        out["digits"].append(sum(ch.isdigit() for ch in number))
        out["chars"].append(len(dose))
        if tokenizer is not None:
            ids = tokenizer(" " + dose, add_special_tokens=False)["input_ids"]
            out["tokens"].append(len(ids))
    return out


def _folds(y: np.ndarray, n_splits: int, rng: np.random.Generator) -> np.ndarray:
    """Stratified fold index per item: each label's items dealt round-robin after a shuffle."""
    fold = np.empty(len(y), dtype=int)
    start = 0
    for lab in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == lab))
        fold[idx] = (np.arange(len(idx)) + start) % n_splits
        start += len(idx)
    return fold


def surface_probe_accuracy(
    feature: Sequence[Hashable], labels: Sequence[Hashable], *, n_splits: int = 5, seeds=(0, 1, 2)
) -> float:
    """Mean over ``seeds`` of the stratified ``n_splits``-fold accuracy of the majority rule.

    The rule predicts, for a held-out item, the most frequent training-fold label among items
    with the same feature value (ties and unseen values: the most frequent training label;
    ties go to the first label in sorted order). Returns a fraction in [0, 1].
    """
    codes: dict[Hashable, int] = {}
    x = np.asarray([codes.setdefault(v, len(codes)) for v in feature])
    _, y = np.unique(np.asarray([str(v) for v in labels]), return_inverse=True)
    n_lab, n_val = int(y.max()) + 1, len(codes)
    accs = []
    for s in seeds:
        fold = _folds(y, n_splits, np.random.default_rng(s))
        correct = 0
        for k in range(n_splits):
            tr, te = fold != k, fold == k
            table = np.zeros((n_val, n_lab), dtype=int)
            np.add.at(table, (x[tr], y[tr]), 1)
            overall = int(np.argmax(np.bincount(y[tr], minlength=n_lab)))
            pred = np.where(table.sum(1) > 0, table.argmax(1), overall)
            correct += int((pred[x[te]] == y[te]).sum())
        accs.append(correct / len(y))
    return float(np.mean(accs))


def permutation_null(
    feature: Sequence[Hashable],
    labels: Sequence[Hashable],
    *,
    n_perm: int = 200,
    seed: int = 0,
    quantile: float = 0.95,
    **kwargs: Any,
) -> float:
    """The ``quantile`` of :func:`surface_probe_accuracy` over ``n_perm`` label permutations."""
    rng = np.random.default_rng(seed)
    lab = np.asarray([str(v) for v in labels])
    null = [surface_probe_accuracy(feature, rng.permutation(lab), **kwargs) for _ in range(n_perm)]
    return float(np.quantile(null, quantile))


def surface_matched_subset(
    feature: Sequence[Hashable], labels: Sequence[Hashable], *, seed: int = 0
) -> list[int]:
    """Sorted item indices where each feature value holds equally many items of every label.

    Per feature value, each label keeps ``min`` (over all labels) of its items there, chosen at
    random with ``seed``; a value lacking some label is dropped entirely. On the subset the
    feature is independent of the label, so a surface probe is at chance by construction.
    """
    rng = np.random.default_rng(seed)
    all_labels = sorted({str(v) for v in labels})
    cells: dict[Hashable, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (v, lab) in enumerate(zip(feature, labels, strict=True)):
        cells[v][str(lab)].append(i)
    keep: list[int] = []
    for by_label in cells.values():
        m = min(len(by_label.get(lab, [])) for lab in all_labels)
        for lab in all_labels:
            if m:
                keep += rng.choice(by_label[lab], size=m, replace=False).tolist()
    return sorted(keep)


def level_counts(feature: Sequence[Hashable], labels: Sequence[Hashable]) -> dict:
    """``{feature value: Counter(label -> n)}``, for error messages and docs."""
    out: dict[Hashable, Counter] = defaultdict(Counter)
    for v, lab in zip(feature, labels, strict=True):
        out[v][lab] += 1
    return dict(out)


def has_amounts(concepts: Sequence[str]) -> bool:
    """True if every concept starts with a written amount (:func:`parse_amount` succeeds)."""
    if not concepts:
        return False
    try:
        for c in concepts:
            parse_amount(c)
    except ValueError:
        return False
    return True


def surface_features(concepts: Sequence[str], tokenizer: Any = None) -> dict[str, list]:
    """:func:`dose_surface_features` plus ``"shape"``: the tuple of all of them per item.

    Keys ``digits``, ``chars``, (with a tokenizer) ``tokens``, then ``shape`` (e.g. the tuple
    ``(digits, chars, tokens)``); the joint feature is the one a matched subset is balanced on,
    so that every single feature is balanced too.
    """
    feats: dict[str, list] = dict(dose_surface_features(concepts, tokenizer))
    feats["shape"] = list(zip(*feats.values(), strict=True))
    return feats


@dataclass
class SurfaceBaseline:
    """The best surface feature for a label and its permutation null.

    Attributes:
        feature: name of the feature with the highest accuracy (first in order on ties).
        accuracy: its :func:`surface_probe_accuracy` (fraction in [0, 1]).
        null: the ``quantile`` over label permutations of the *maximum* accuracy over all
            features (the null of the selected maximum, so choosing the best feature does not
            inflate the comparison).
        accuracies: ``{feature: accuracy}`` for every feature.
        nulls: ``{feature: quantile}`` of each feature's own accuracy over the same
            permutations (equal to :func:`permutation_null` with the same ``seed``).
        n: number of items.
    """

    feature: str
    accuracy: float
    null: float
    accuracies: dict[str, float]
    nulls: dict[str, float]
    n: int


def surface_baseline(
    features: Mapping[str, Sequence[Hashable]],
    labels: Sequence[Hashable],
    *,
    n_perm: int = 200,
    seed: int = 0,
    quantile: float = 0.95,
    **kwargs: Any,
) -> SurfaceBaseline:
    """Maximum over ``features`` of :func:`surface_probe_accuracy`, with the null of that maximum.

    ``features``: ``{name: per-item values}`` (each as long as ``labels``). Each of ``n_perm``
    label permutations (``numpy`` generator seeded with ``seed``) is scored on every feature;
    ``null`` is the ``quantile`` of the per-permutation maxima, ``nulls`` the per-feature
    quantiles. ``kwargs`` go to
    :func:`surface_probe_accuracy` (``n_splits``, ``seeds``).
    """
    if not features:
        raise ValueError("surface_baseline needs at least one feature")
    for name, v in features.items():
        if len(v) != len(labels):
            raise ValueError(f"feature {name!r} has {len(v)} values for {len(labels)} labels")
    accs = {name: surface_probe_accuracy(v, labels, **kwargs) for name, v in features.items()}
    best = max(accs, key=lambda k: accs[k])
    rng = np.random.default_rng(seed)
    lab = np.asarray([str(v) for v in labels])
    null = np.empty((n_perm, len(features)))
    for p in range(n_perm):
        perm = rng.permutation(lab)
        null[p] = [surface_probe_accuracy(v, perm, **kwargs) for v in features.values()]
    q = {name: float(np.quantile(null[:, j], quantile)) for j, name in enumerate(features)}
    top = float(np.quantile(null.max(axis=1), quantile))
    return SurfaceBaseline(best, accs[best], top, accs, q, len(lab))


def matched_on(
    features: Mapping[str, Sequence[Hashable]],
    labels: Sequence[Hashable],
    *,
    min_per_label: int = 4,
    n_perm: int = 200,
    seed: int = 0,
) -> tuple[tuple[str, ...], list[int]] | None:
    """The surface-matched subset on the joint of as many ``features`` as the items allow.

    Candidates are the joint features of every combination of ``features``, most features
    first, then the larger subset (:func:`surface_matched_subset` with ``seed``). The first one
    whose subset holds at least ``min_per_label`` items of every label, and on which every
    feature *not* matched on reads the label at most at its :func:`permutation_null`
    (``n_perm``, ``seed``), wins. Matching all features is always tried first, so it wins
    whenever its subset is large enough (no further check is needed: every feature is then
    balanced). Returns ``(names matched on, sorted indices)``, or ``None`` if no candidate
    qualifies.
    """
    names = list(features)
    n_labels = len({str(v) for v in labels})
    for r in range(len(names), 0, -1):
        cands = []
        for combo in combinations(names, r):
            joint = list(zip(*(features[k] for k in combo), strict=True))
            cands.append((combo, surface_matched_subset(joint, labels, seed=seed)))
        cands.sort(key=lambda c: -len(c[1]))  # stable: equal sizes keep the feature order
        for combo, sub in cands:
            if len(sub) < min_per_label * n_labels:
                break
            ls = [labels[i] for i in sub]
            rest = [k for k in names if k not in combo]
            if all(
                surface_probe_accuracy(fs, ls) <= permutation_null(fs, ls, n_perm=n_perm, seed=seed)
                for fs in ([features[k][i] for i in sub] for k in rest)
            ):
                return combo, sub
    return None
