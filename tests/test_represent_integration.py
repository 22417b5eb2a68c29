"""representation_map end to end: a tiny random model (always) and SmolLM2-135M (``real``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from medmap.analysis.results import COLUMNS
from medmap.errors import MedmapError
from medmap.techniques.representation import representation_map

# ---------------------------------------------------------------- a minimal concept set


@dataclass
class _Spec:
    kind: str
    order: list | None = None


@dataclass
class _Item:
    id: str
    concept: str
    labels: dict = field(default_factory=dict)


@dataclass
class _Rendered:
    item_id: str
    item_index: int
    template_index: int
    text: str
    span: tuple[int, int]


class _AgeSet:
    """Duck-typed stand-in for a ConceptSet (the interface medmap.concepts provides)."""

    name = "ages_tiny"
    family = "ages"
    medical = True
    templates = [
        "A {concept}-year-old woman has chest pain.",
        "The patient is {concept} years old.",
    ]

    def __init__(self, ages):
        self.labels = {
            "age": _Spec("ordinal"),
            "life_stage": _Spec("categorical"),
            "code": _Spec("identifier"),
        }
        self.items = [
            _Item(
                f"age_{a}",
                str(a),
                {"age": a, "life_stage": "child" if a < 18 else "adult", "code": f"c{a}"},
            )
            for a in ages
        ]

    def render(self):
        out = []
        for i, it in enumerate(self.items):
            for t, tpl in enumerate(self.templates):
                start = tpl.index("{concept}")
                text = tpl.replace("{concept}", it.concept)
                out.append(_Rendered(it.id, i, t, text, (start, start + len(it.concept))))
        return out

    def label_values(self, name):
        return [it.labels[name] for it in self.items]

    def subset(self, max_items, seed=0):
        rng = np.random.default_rng(seed)
        keep = sorted(rng.choice(len(self.items), max_items, replace=False))
        return _AgeSet([self.items[i].labels["age"] for i in keep])


AGES = list(range(2, 30, 2)) + [33]


@pytest.fixture(scope="module")
def tiny():
    from tiny import make_tiny

    return make_tiny("llama", n_layers=3)


def _check_outputs(res, n_items: int, n_layers: int, set_name: str):
    tab = res.table
    assert list(tab.columns[: len(COLUMNS)]) == COLUMNS
    assert set(tab.concept_set) == {set_name}
    layers = sorted(set(tab.layer) - {-1})
    assert layers == list(range(n_layers + 1))
    scored = tab[tab.technique.isin(["cluster", "probe", "geometry", "umap"])]
    assert np.isfinite(scored.value).all()
    assert {"knn_purity", "silhouette", "probe_acc", "probe_r2", "probe_spearman"} <= set(
        tab.metric
    )
    assert {"effective_rank", "anisotropy", "mean_norm", "collapse_recover"} <= set(tab.metric)
    assert not (tab.label == "code").any()  # identifiers are never scored
    c = res.coords
    assert len(c) == n_items * (n_layers + 1)
    assert np.isfinite(c[["x", "y"]].to_numpy()).all()
    assert {"item_id", "layer", "x", "y", "age", "life_stage"} <= set(c.columns)


def test_tiny_model_concept_position(tiny):
    cs = _AgeSet(AGES)
    res = representation_map(tiny, cs, n_boot=30, progress=False)
    _check_outputs(res, len(AGES), tiny.n_layers, "ages_tiny")
    tab = res.table
    assert set(tab.position) == {"concept"}
    assert set(tab.model) == {tiny.name}
    # token counts came from the tokenizer: the controlled and uncontrolled detectors both exist
    assert {"age_jump_ratio", "age_jump_ratio_uncontrolled", "age_nonlinearity_gap"} <= set(
        tab.metric
    )
    assert (tab[tab.metric == "probe_acc"].n == len(AGES)).all()


def test_tiny_model_last_position_and_subset(tiny):
    cs = _AgeSet(AGES)
    res = representation_map(
        tiny,
        cs,
        position="last",
        max_items=10,
        max_templates=1,
        umap=False,
        n_boot=20,
        progress=False,
    )
    assert set(res.table.position) == {"last"}
    assert res.coords.empty
    assert (res.table[res.table.metric == "probe_r2"].n == 10).all()


def test_store_reused_and_precomputed_activations(tiny, tmp_path, monkeypatch):
    cs = _AgeSet(AGES[:8])
    store = tmp_path / "acts"
    first = representation_map(tiny, cs, n_boot=20, umap=False, progress=False, store_dir=store)
    assert (store / "manifest.json").exists()

    import medmap.techniques.capture

    def no_capture(*a, **k):
        raise AssertionError("capture must not run when the store holds the activations")

    monkeypatch.setattr(medmap.techniques.capture, "capture", no_capture)
    again = representation_map(tiny, cs, n_boot=20, umap=False, progress=False, store_dir=store)
    pd.testing.assert_frame_equal(first.table, again.table)
    with pytest.raises(MedmapError, match="other prompts"):
        representation_map(
            tiny, cs, position="last", n_boot=20, umap=False, progress=False, store_dir=store
        )
    from medmap.techniques.capture.store import open_store

    acts, _ = open_store(store)
    pre = representation_map(
        tiny, cs, n_boot=20, umap=False, progress=False, activations=np.asarray(acts)
    )
    pd.testing.assert_frame_equal(first.table, pre.table)
    with pytest.raises(MedmapError, match="expected"):
        representation_map(tiny, cs, progress=False, activations=np.asarray(acts)[:3])
    with pytest.raises(MedmapError, match="position"):
        representation_map(tiny, cs, position="middle", progress=False)


def test_cli_rejects_bad_position(tmp_path):
    from medmap.cli import main

    code = main(
        ["umap", "--model", "x", "--concepts", "y", "--out", str(tmp_path), "--position", "mid"]
    )
    assert code == 2


# ---------------------------------------------------------------- real model


@pytest.mark.real
def test_smollm2_progression_and_ages():
    import medmap

    model = medmap.load_model("smollm2-135m")
    for name in ("progression", "ages"):
        cs = medmap.load_concepts(name)
        res = representation_map(
            model, cs, max_items=16, max_templates=2, n_boot=30, progress=False
        )
        n_items = min(16, len(cs.items))
        tab = res.table
        assert list(tab.columns[: len(COLUMNS)]) == COLUMNS
        assert sorted(set(tab.layer) - {-1}) == list(range(model.n_layers + 1))
        core = tab[tab.technique.isin(["cluster", "probe", "geometry"])]
        assert len(core) > 0 and np.isfinite(core.value).all()
        assert len(res.coords) == n_items * (model.n_layers + 1)
        assert np.isfinite(res.coords[["x", "y"]].to_numpy()).all()
        if name == "progression":
            assert (tab.metric == "progression_circularity").any()
        else:
            assert (tab.metric == "age_jump_ratio").any()


@pytest.mark.real
def test_cli_umap_real(tmp_path):
    from medmap.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "umap",
            "--model",
            "smollm2-135m",
            "--concepts",
            "drugs",
            "--out",
            str(out),
            "--max-items",
            "32",  # drugs subsets are balanced on 16 specialties: 2 per specialty
            "--max-templates",
            "1",
            "--n-boot",
            "20",
        ]
    )
    assert code == 0
    tab = pd.read_parquet(out / "results.parquet")
    coords = pd.read_parquet(out / "umap_coords.parquet")
    assert list(tab.columns[: len(COLUMNS)]) == COLUMNS
    assert (tab.metric == "specialty_minus_mechanism_purity").any()
    assert set(coords.concept_set) == {"drugs"} and len(coords) > 0
