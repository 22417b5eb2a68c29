"""The techniques: capture, representation maps, weight saliency, lesioning, patching, knowledge.

One module (or sub-package) per technique. Each takes plain prompt/target strings or a concept
set and returns tidy result rows (:mod:`medmap.analysis.results`). Names are re-exported here
lazily, so importing one technique does not import the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_API: dict[str, str] = {
    "representation_map": "medmap.techniques.representation",
    "representation_scores": "medmap.techniques.representation",
    "analyse_activations": "medmap.techniques.representation",
    "answer_token": "medmap.techniques.patching",
    "concept_pairs": "medmap.techniques.patching",
    "patch": "medmap.techniques.patching",
    "patch_concepts": "medmap.techniques.patching",
    "patch_summary": "medmap.techniques.patching",
    "lesion": "medmap.techniques.lesioning",
    "lesion_concepts": "medmap.techniques.lesioning",
    "lesion_specificity": "medmap.techniques.lesioning",
    "lesion_summary": "medmap.techniques.lesioning",
    "saliency_items": "medmap.techniques.saliency",
    "saliency_specificity": "medmap.techniques.saliency",
    "saliency_summary": "medmap.techniques.saliency",
    "weight_saliency": "medmap.techniques.saliency",
    "weight_saliency_concepts": "medmap.techniques.saliency",
    "knows": "medmap.techniques.knowledge",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'medmap.techniques' has no attribute {name!r}")
