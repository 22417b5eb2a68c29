"""medmap: where does a language model store medical knowledge?

Data flows one way: concepts → prompts → model adapter → activations / interventions →
metrics → map → report. The public API is re-exported here and imported lazily so that
``import medmap`` stays cheap (torch and transformers load on first use).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API: dict[str, str] = {
    # foundation
    "load_model": "medmap.loading",
    "MedmapModel": "medmap.loading",
    "BUNDLED_MODELS": "medmap.registry",
    "LayerAdapter": "medmap.adapter",
    "find_layers": "medmap.adapter",
    "TraceBlocks": "medmap.hooks",
    "ReplaceBlocks": "medmap.hooks",
    "capture": "medmap.activations",
    "ActivationStore": "medmap.store",
    "MedmapError": "medmap.errors",
    "bootstrap_ci": "medmap.stats",
    # concepts
    "load_concepts": "medmap.concepts",
    "list_concepts": "medmap.concepts",
    "ConceptSet": "medmap.concepts",
    "counterfactual_pairs": "medmap.concepts",
    "knows": "medmap.concepts.knows",
    "compare_precision": "medmap.precision",
    # techniques
    "representation_map": "medmap.represent",
    "weight_saliency": "medmap.causal",
    "lesion": "medmap.causal",
    "patch": "medmap.causal",
    # map and report
    "knowledge_map": "medmap.maps",
    "run_map": "medmap.runner",
    "compare_runs": "medmap.compare",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'medmap' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from medmap.activations import capture  # noqa: F401
    from medmap.loading import MedmapModel, load_model  # noqa: F401
