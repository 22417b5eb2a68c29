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
    "load_model": "medmap.model.loading",
    "MedmapModel": "medmap.model.loading",
    "BUNDLED_MODELS": "medmap.model.registry",
    "LayerAdapter": "medmap.model.adapter",
    "find_layers": "medmap.model.adapter",
    "TraceBlocks": "medmap.model.sites",
    "Trace": "medmap.model.sites",
    "SkipBlocks": "medmap.model.sites",
    "capture": "medmap.techniques.capture",
    "ActivationStore": "medmap.techniques.capture.store",
    "MedmapError": "medmap.errors",
    "bootstrap_ci": "medmap.analysis.stats",
    "two_sample_ci": "medmap.analysis.stats",
    "relative_depth": "medmap.analysis.results",
    # concepts
    "load_concepts": "medmap.concepts",
    "list_concepts": "medmap.concepts",
    "ConceptSet": "medmap.concepts",
    "counterfactual_pairs": "medmap.concepts",
    "knows": "medmap.techniques.knowledge",
    "compare_precision": "medmap.model.precision",
    # techniques (the interface every technique implements, and its registry)
    "Technique": "medmap.techniques.base",
    "Cell": "medmap.techniques.base",
    "RunContext": "medmap.techniques.base",
    "TECHNIQUES": "medmap.techniques.base",
    "register_technique": "medmap.techniques.base",
    "get_technique": "medmap.techniques.base",
    "representation_map": "medmap.techniques.representation",
    "weight_saliency": "medmap.techniques",
    "lesion": "medmap.techniques",
    "patch": "medmap.techniques",
    # map and report
    "knowledge_map": "medmap.analysis.maps",
    "KnowledgeMap": "medmap.analysis.maps",
    "set_roles": "medmap.analysis.maps",
    "build_outputs": "medmap.analysis.maps",
    "specificity_map": "medmap.analysis.specificity",
    "seed_agreement": "medmap.analysis.compare",
    "RunConfig": "medmap.run.config",
    "build_config": "medmap.run.config",
    "Run": "medmap.run.rundir",
    "run_map": "medmap.run.runner",
    "run_technique": "medmap.run.runner",
    "compare_runs": "medmap.analysis.compare",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'medmap' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from medmap.model.loading import MedmapModel, load_model  # noqa: F401
    from medmap.techniques.capture import capture  # noqa: F401
