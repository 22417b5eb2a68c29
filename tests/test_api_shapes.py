"""One shape for every technique (issue 14): a concept set or plain strings, the same tidy rows.

Also: saliency runs on the shared resumable sweep (:func:`medmap.techniques.sweep.sweep_cells`)
with its old cell keys, per-item gradients, progress and gradient bookkeeping.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from medmap.analysis.results import COLUMNS
from medmap.concepts import ConceptSet
from medmap.errors import MedmapError
from medmap.run.cells import CellCache, cell_key, model_identity
from medmap.techniques import lesion_concepts, patch_concepts, weight_saliency_concepts
from medmap.techniques.concept_io import concept_targets
from medmap.techniques.patching import concept_pairs
from medmap.techniques.representation import representation_map
from medmap.techniques.saliency import item_loss, saliency_items
from tiny import make_tiny

# Concepts of equal token length in pairs under the tiny tokenizer (insulin / aspirin / liver:
# 6 tokens with a leading space, dog / cat / statin: 2), so counterfactual pairs exist.
CONCEPTS = ["insulin", "aspirin", "liver", "dog", "cat", "statin"]
ANSWERS = [" diabetes", " pain", " fever", " mammal", " pet", " cholesterol"]
KINDS = ["drug", "drug", "organ", "animal", "animal", "drug"]


def _data() -> dict:
    return {
        "name": "tiny_api",
        "version": 1,
        "family": "custom",
        "medical": False,
        "labels": {"kind": {"kind": "categorical"}},
        "templates": ["The patient took {concept} today."],
        "items": [
            {
                "id": c,
                "concept": c,
                "labels": {"kind": k},
                "targets": [
                    {"id": "use", "prompt": "The patient took {concept} for", "answers": [a]}
                ],
            }
            for c, a, k in zip(CONCEPTS, ANSWERS, KINDS)
        ],
    }


@pytest.fixture(scope="module")
def cs() -> ConceptSet:
    return ConceptSet.model_validate(_data())


@pytest.fixture(scope="module")
def model():
    m = make_tiny("llama", seed=31)
    m.hf.requires_grad_(False)  # as load_model leaves it
    return m


def _plain(cs):
    ct = concept_targets(cs)
    return ct.prompts, ct.targets


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert len(a) > 0 and list(a.columns) == list(b.columns)
    assert set(COLUMNS) <= set(a.columns)
    pd.testing.assert_frame_equal(
        a.drop(columns="concept_set"), b.drop(columns="concept_set"), rtol=0, atol=0
    )


# ---- item 2: a concept set (object, path, bundled name) or plain strings, one shape -------------


def test_lesion_concept_set_and_plain_strings_give_the_same_rows(model, cs, tmp_path):
    prompts, targets = _plain(cs)
    a = lesion_concepts(model, cs, layers=[1, 3], n_boot=30)
    b = lesion_concepts(model, prompts=prompts, targets=targets, layers=[1, 3], n_boot=30)
    _same_rows(a, b)
    assert set(a["concept_set"]) == {"tiny_api"} and set(b["concept_set"]) == {"custom"}
    assert set(a["metric"]) == {"delta_nll", "delta_top1", "delta_topk"}
    assert (a["n"] == 6).all() and (a.loc[a["metric"] == "delta_nll", "value"].abs() > 0).all()
    # a path to a concept file gives the same rows as the object
    path = tmp_path / "tiny_api.yaml"
    path.write_text(yaml.safe_dump(_data()))
    pd.testing.assert_frame_equal(lesion_concepts(model, path, layers=[1, 3], n_boot=30), a)
    pd.testing.assert_frame_equal(lesion_concepts(model, str(path), layers=[1, 3], n_boot=30), a)
    # plain strings keep their first max_items; a name given to them is written to the rows
    c = lesion_concepts(
        model, prompts=prompts, targets=targets, max_items=2, concept_set="mine", layers=[1]
    )
    assert (c["n"] == 2).all() and set(c["concept_set"]) == {"mine"}


def test_bundled_name_equals_its_plain_strings(model):
    from medmap.concepts import load_concepts
    from medmap.techniques.concept_io import select_items

    ct = concept_targets(select_items(load_concepts("drugs"), 2, 0))
    a = lesion_concepts(model, "drugs", max_items=2, layers=[2], n_boot=20)
    b = lesion_concepts(model, prompts=ct.prompts, targets=ct.targets, layers=[2], n_boot=20)
    _same_rows(a, b)
    assert set(a["concept_set"]) == {"drugs"} and (a["n"] == len(ct.prompts)).all()


def test_saliency_concept_set_and_plain_strings_give_the_same_rows(model, cs):
    from medmap.techniques.concept_io import select_items

    ct = concept_targets(select_items(cs, 3, 0))  # max_items of a set: a stratified subset
    assert ct.prompts != _plain(cs)[0][:3]
    a = weight_saliency_concepts(model, cs, max_items=3, n_boot=30)
    b = weight_saliency_concepts(model, prompts=ct.prompts, targets=ct.targets, n_boot=30)
    _same_rows(a, b)
    assert set(a["objective"]) == {"nll"} and (a["n"] == 3).all()
    blocks = a[(a["module"] == "block") & (a["metric"] == "grad_abs_share")]
    assert len(blocks) == model.n_layers and (blocks["value"] > 0).all()
    assert a.attrs["total_grad_bytes"] == b.attrs["total_grad_bytes"] > 0
    assert not any(p.requires_grad for p in model.hf.parameters())


def test_patching_concept_set_and_plain_lists_give_the_same_rows(model, cs):
    pairs = concept_pairs(model, cs, max_pairs=4, seed=0)
    assert len(pairs["clean_prompts"]) == 4
    a = patch_concepts(model, cs, max_pairs=4, layers=[0, 2, 3], n_boot=30)
    b = patch_concepts(model, layers=[0, 2, 3], n_boot=30, **pairs)
    _same_rows(a, b)
    assert set(a["position"]) == {"last", "concept"} and set(a["layer"]) == {0, 2, 3}
    # the last residual layer restores the clean run exactly at the last position
    last = a[(a["layer"] == 3) & (a["position"] == "last")]
    assert last["value"].to_numpy() == pytest.approx([1.0])
    # plain lists without spans: position 'concept' is refused in one line, 'last' works
    plain = {k: v for k, v in pairs.items() if k not in ("concept_spans", "pair_ids")}
    with pytest.raises(MedmapError, match="needs concept_spans"):
        patch_concepts(model, layers=[3], **plain)
    c = patch_concepts(model, layers=[0, 2, 3], positions="last", n_boot=30, **plain)
    _same_rows(c, a[a["position"] == "last"].reset_index(drop=True))


def test_representation_concept_set_and_plain_strings_give_the_same_rows(model, cs):
    prompts = [p.text for p in cs.render()]
    spans = [p.span for p in cs.render()]
    opts = dict(umap=False, n_boot=20, n_null=10, n_perm=3, progress=False)
    a = representation_map(model, cs, **opts)
    b = representation_map(model, prompts=prompts, labels={"kind": KINDS}, spans=spans, **opts)
    assert set(a.table["concept_set"]) == {"tiny_api"} and set(b.table["concept_set"]) == {"custom"}
    _same_rows(a.table, b.table)
    assert {"silhouette", "knn_purity"} <= set(a.table["metric"])
    assert np.isfinite(a.table.loc[a.table["metric"] == "silhouette", "value"]).all()
    with pytest.raises(MedmapError, match="needs spans"):
        representation_map(model, prompts=prompts, labels={"kind": KINDS}, **opts)
    last = representation_map(
        model, prompts=prompts, labels={"kind": KINDS}, position="last", **opts
    )
    _same_rows(last.table, representation_map(model, cs, position="last", **opts).table)


def test_one_source_of_items_in_one_clear_line(model, cs):
    prompts, targets = _plain(cs)
    with pytest.raises(MedmapError, match="not both"):
        lesion_concepts(model, cs, prompts=prompts, targets=targets)
    with pytest.raises(MedmapError, match="no targets"):
        weight_saliency_concepts(model, prompts=prompts)
    with pytest.raises(MedmapError, match="one string"):
        lesion_concepts(model, prompts=prompts[0], targets=targets[0])
    with pytest.raises(MedmapError, match="6 prompts but 2 targets"):
        lesion_concepts(model, prompts=prompts, targets=targets[:2])
    with pytest.raises(MedmapError, match="item_ids go with plain prompts"):
        lesion_concepts(model, cs, item_ids=["a"] * 6)
    with pytest.raises(MedmapError, match="no concept set and no"):
        patch_concepts(model)
    with pytest.raises(MedmapError, match="unknown concept set"):
        lesion_concepts(model, "no_such_set")


# ---- item 1: saliency on the shared sweep ------------------------------------------------------

PROMPTS = [
    "A 47-year-old woman presents with",
    "Metformin is a first-line treatment for",
    "A dog is a",
]
TARGETS = [" chest pain", " type 2 diabetes", " mammal"]


def _old_key(model, sl: slice, **margin) -> str:
    """The cell key as saliency_items computed it before it used sweep_cells."""
    return cell_key(
        technique="saliency",
        model=model_identity(model),
        concept_set="custom",
        prompts=list(PROMPTS[sl]),
        targets=list(TARGETS[sl]),
        ids=[str(i) for i in range(len(PROMPTS))][sl],
        **margin,
    )


def test_saliency_cells_keep_their_keys_and_old_caches_are_reused(model, tmp_path):
    df = saliency_items(model, PROMPTS, TARGETS, batch_size=2, cache_dir=tmp_path)
    keys = [_old_key(model, slice(0, 2)), _old_key(model, slice(2, 3))]
    assert sorted(f.name for f in tmp_path.glob("*.parquet")) == sorted(
        f"saliency-{k}.parquet" for k in keys
    )
    assert df.attrs["peak_grad_bytes"] > 0
    # a cache written before the change (old key, no objective column) is found and not
    # recomputed: doctored losses come back, no gradient is taken
    old = tmp_path / "old"
    cache = CellCache(old, "saliency")
    cells = [df[df["item"] < 2], df[df["item"] == 2]]
    for key, cell in zip(keys, cells):
        cache.put(key, cell.drop(columns="objective").assign(loss=-123.0).reset_index(drop=True))
    again = saliency_items(model, PROMPTS, TARGETS, batch_size=2, cache_dir=old)
    assert (again["loss"] == -123.0).all() and (again["objective"] == "nll").all()
    pd.testing.assert_frame_equal(again.drop(columns="loss"), df.drop(columns="loss"))
    assert again.attrs["peak_grad_bytes"] == 0  # nothing computed
    assert again.attrs["total_grad_bytes"] == df.attrs["total_grad_bytes"]
    # half a cache: only the missing chunk is computed, with its true losses
    half = tmp_path / "half"
    CellCache(half, "saliency").put(keys[0], cells[0].drop(columns="objective").assign(loss=7.0))
    mixed = saliency_items(model, PROMPTS, TARGETS, batch_size=2, cache_dir=half)
    assert (mixed.loc[mixed["item"] < 2, "loss"] == 7.0).all()
    want = float(item_loss(model, PROMPTS[2], TARGETS[2]).detach())
    assert mixed.loc[mixed["item"] == 2, "loss"].iloc[0] == pytest.approx(want, abs=1e-6)
    assert mixed.attrs["peak_grad_bytes"] > 0
    assert all(p.grad is None and not p.requires_grad for p in model.hf.parameters())


def test_saliency_margin_cells_keep_their_keys(model, tmp_path):
    dis = [[" a statin"], [" Paris", " chest pain"], [" pet"]]
    saliency_items(
        model, PROMPTS, TARGETS, batch_size=2, cache_dir=tmp_path, distractors=dis,
        objective="margin",
    )  # fmt: skip
    keys = [
        _old_key(model, slice(0, 2), objective="margin", distractors=dis[0:2]),
        _old_key(model, slice(2, 3), objective="margin", distractors=dis[2:3]),
    ]
    assert sorted(f.name for f in tmp_path.glob("*.parquet")) == sorted(
        f"saliency-{k}.parquet" for k in keys
    )


def test_saliency_values_do_not_depend_on_the_chunking(model):
    one = saliency_items(model, PROMPTS, TARGETS, batch_size=1)
    all3 = saliency_items(model, PROMPTS, TARGETS, batch_size=3)
    pd.testing.assert_frame_equal(one, all3)
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):  # per-item losses, one pass each
        loss = one.loc[one["item"] == i, "loss"].iloc[0]
        assert loss == pytest.approx(float(item_loss(model, p, t).detach()), abs=1e-6)
    assert one["loss"].nunique() == 3


def test_saliency_progress_counts_items(model, tmp_path, monkeypatch):
    import medmap.techniques.sweep as sweep

    seen = []

    from contextlib import contextmanager

    @contextmanager
    def fake_bar(description, total, *, enabled=True):
        steps = []
        seen.append((description, total, enabled, steps))
        yield lambda n=1: steps.append(n)

    monkeypatch.setattr(sweep, "progress_bar", fake_bar)
    saliency_items(model, PROMPTS, TARGETS, batch_size=2, progress=True, cache_dir=tmp_path)
    saliency_items(model, PROMPTS, TARGETS, batch_size=2, progress=True, cache_dir=tmp_path)
    (d1, t1, e1, s1), (d2, t2, e2, s2) = seen
    assert (d1, t1, e1) == (d2, t2, e2) == ("saliency", 3, True)
    # one step per item, a cell at a time: computed cells, then the same from the cache
    assert [n for n in s1 if n] == [n for n in s2 if n] == [2, 1]


def test_saliency_out_of_memory_is_not_retried_and_restores_grad_flags(model, monkeypatch):
    import medmap.techniques.saliency as sal

    calls = []
    real = sal.item_loss

    def oom_on_second(m, prompt, target):
        calls.append(prompt)
        if prompt == PROMPTS[1]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(m, prompt, target)

    monkeypatch.setattr(sal, "item_loss", oom_on_second)
    with pytest.raises(MedmapError, match="saliency item 1"):
        saliency_items(model, PROMPTS, TARGETS, batch_size=3)
    assert calls == PROMPTS[:2]  # no halved retry of the chunk: items are one per pass already
    assert all(p.grad is None and not p.requires_grad for p in model.hf.parameters())


def test_sweep_without_backoff_calls_compute_once_and_keeps_the_error(tmp_path):
    from medmap.techniques.sweep import sweep_cells

    def run(backoff):
        calls = []

        def compute(sl, layers, emit):
            calls.append((sl.start, sl.stop))
            if sl.stop - sl.start > 1:
                raise RuntimeError("CUDA out of memory")
            for layer in layers:
                emit(layer, pd.DataFrame({"item": [sl.start], "layer": [layer]}))

        cache = CellCache(tmp_path / str(backoff), "t")
        key = lambda sl, layer: f"{sl.start}-{sl.stop}-{layer}"  # noqa: E731
        try:
            out = sweep_cells(4, 2, [0], key, compute, cache, backoff=backoff)
        except RuntimeError as e:
            return calls, e
        return calls, out

    calls, out = run(True)
    assert calls == [(0, 2), (0, 1), (1, 2), (2, 3), (3, 4)]  # halved, then kept at 1
    assert [list(df["item"]) for df in out] == [[0, 1], [2, 3]]
    calls, err = run(False)
    assert calls == [(0, 2)] and "out of memory" in str(err)
