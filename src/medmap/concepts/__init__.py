"""The medical concept library: curated, sourced concept sets (data files in ``data/``).

``load_concepts(name_or_path)`` returns a validated :class:`ConceptSet`; ``list_concepts()``
names the bundled sets; ``counterfactual_pairs`` builds clean/corrupt prompt pairs; ``knows``
(in :mod:`medmap.techniques.knowledge`) scores whether a model knows each fact.
"""

from medmap.concepts.loader import list_concepts, load_concepts, load_file
from medmap.concepts.pairs import Pair, counterfactual_pairs, pair_survival
from medmap.concepts.schema import (
    ConceptItem,
    ConceptSet,
    LabelSpec,
    RenderedPrompt,
    RenderedTarget,
    Target,
)

__all__ = [
    "ConceptItem",
    "ConceptSet",
    "LabelSpec",
    "Pair",
    "RenderedPrompt",
    "RenderedTarget",
    "Target",
    "counterfactual_pairs",
    "list_concepts",
    "load_concepts",
    "load_file",
    "pair_survival",
]
