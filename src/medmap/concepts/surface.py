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
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
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
