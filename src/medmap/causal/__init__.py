"""Causal techniques: weight-gradient saliency, layer lesioning and activation patching.

Each technique takes plain prompt/target strings (``*_concepts`` wrappers take a concept set),
returns per-item detail frames and tidy result rows (:mod:`medmap.results`), and can split its
work into resumable cells under a ``cache_dir``.
"""

from .lesion import lesion, lesion_concepts, lesion_specificity, lesion_summary
from .patching import answer_token, concept_pairs, patch, patch_concepts, patch_summary
from .saliency import (
    classify_block_param,
    saliency_items,
    saliency_specificity,
    saliency_summary,
    weight_saliency,
    weight_saliency_concepts,
)

__all__ = [
    "answer_token",
    "classify_block_param",
    "concept_pairs",
    "lesion",
    "lesion_concepts",
    "lesion_specificity",
    "lesion_summary",
    "patch",
    "patch_concepts",
    "patch_summary",
    "saliency_items",
    "saliency_specificity",
    "saliency_summary",
    "weight_saliency",
    "weight_saliency_concepts",
]
