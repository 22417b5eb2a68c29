"""Technique 1, representation maps: per-layer UMAP, cluster/probe scores and detectors.

Public API: :func:`representation_map` (model + concept set), :func:`representation_scores`
and :func:`analyse_activations` (arrays, no model), :class:`RepresentationResult`.
"""

from medmap.techniques.representation.api import (
    RepresentationResult,
    analyse_activations,
    representation_scores,
)
from medmap.techniques.representation.model import representation_map

__all__ = [
    "RepresentationResult",
    "analyse_activations",
    "representation_map",
    "representation_scores",
]
