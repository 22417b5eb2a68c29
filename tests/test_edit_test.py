"""Map-guided editing (medmap.experiments.edit_test) on a tiny random model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from medmap.errors import MedmapError
from medmap.experiments.edit_test import (
    EditTestConfig,
    Fact,
    edit_test,
    rank_blocks,
    split_items,
)
from tiny import make_tiny


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: one intra-op thread is faster than two on a shared CPU (no spin-waiting)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CFG = EditTestConfig(
    k=1, seeds=2, draws=2, steps=3, lr=1e-2, max_items=4, max_distractors=3, neutral_lines=4,
    controls=("countries",), n_boot=100,
)  # fmt: skip


def sharp_tiny():
    # final-norm gain ×30: a random tiny model's unembedding otherwise caps logits near ±1
    m = make_tiny("llama", n_layers=4)
    with torch.no_grad():
        m.adapter.final_norm.weight.mul_(30.0)
    return m


def test_edit_test_runs_end_to_end_and_is_deterministic(tmp_path):
    m = sharp_tiny()
    before = {k: v.clone() for k, v in m.hf.state_dict().items()}
    table, summary = edit_test(m, CFG, tmp_path / "a")
    # 2 seeds × (map + least + 2 random draws)
    assert len(table) == 2 * 4
    assert (
        table.groupby("seed")["choice"].apply(sorted).tolist()
        == [["least", "map", "random", "random"]] * 2
    )
    assert all(len(b.split(",")) == 1 for b in table["blocks"])
    for _, g in table.groupby("seed"):  # map and least are the two ends of one ranking
        assert (
            g.loc[g["choice"] == "map", "blocks"].iloc[0]
            != g.loc[g["choice"] == "least", "blocks"].iloc[0]
        )
    # unlearning lowered the trained facts' margins; metrics are finite
    assert (table["forget_train_drop"] > 0).all()
    assert np.isfinite(table[["forget_drop", "control_drop", "neutral_increase"]]).all().all()
    np.testing.assert_allclose(table["selectivity"], table["forget_drop"] - table["control_drop"])
    # held-out and trained facts never share an item
    assert (table["n_forget"] + table["n_heldout"] > 0).all()
    s = summary.set_index(["metric", "label"])
    r = s.loc[("selectivity", "random")]
    assert r["n"] == 4 and r["ci_low"] <= r["value"] <= r["ci_high"]
    assert ("selectivity", "map_minus_random") in s.index
    # weights untouched afterwards
    after = m.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the same seed gives identical tables (a fresh directory, nothing reused)
    t2, s2 = edit_test(m, CFG, tmp_path / "b")
    pd.testing.assert_frame_equal(table, t2)
    pd.testing.assert_frame_equal(summary, s2)
    assert (tmp_path / "a" / "edit_test.parquet").exists()
    # resumable: an interrupted run (one edit's cell missing) finishes with the same table
    cells = sorted((tmp_path / "a" / "cells").glob("edit-*.parquet"))
    assert len(cells) == len(table)
    cells[0].unlink()
    t3, _ = edit_test(m, CFG, tmp_path / "a")
    pd.testing.assert_frame_equal(table, t3)
    # fewer seeds and draws in the same directory reuse the finished edits (not recomputed)
    import medmap.experiments.edit_test as et

    real = et.unlearn, et.lesion_map
    et.unlearn = lambda *a, **k: pytest.fail("a finished edit was recomputed")
    et.lesion_map = lambda *a, **k: pytest.fail("a finished seed's lesion map was recomputed")
    try:
        t4, _ = edit_test(m, replace(CFG, seeds=1, draws=1), tmp_path / "a")
    finally:
        et.unlearn, et.lesion_map = real
    want = table[(table["seed"] == table["seed"].min()) & (table["draw"] == 0)]
    pd.testing.assert_frame_equal(t4, want.reset_index(drop=True))
    from medmap.experiments.report import edit_test_section

    html = edit_test_section(tmp_path / "a", write=True)
    assert "Map-guided editing" in html and "data:image/png;base64," in html
    assert (tmp_path / "a" / "edit_test.png").exists()
    assert edit_test_section(tmp_path / "missing") == ""


def test_split_items_keeps_a_concept_together():
    facts = [Fact("s", f"i{i // 2}", f"t{i % 2}", "p", " a", (" b",)) for i in range(8)]
    a, b = split_items(facts, 3)
    assert {f.item_id for f in a}.isdisjoint({f.item_id for f in b})
    assert len(a) == len(b) == 4
    assert split_items(facts, 3) == (a, b)


def test_rank_blocks_orders_by_score_then_block():
    assert rank_blocks(np.array([0.1, 2.0, 2.0, -1.0])) == [1, 2, 0, 3]


def test_defaults_and_bad_settings():
    assert EditTestConfig().draws >= 5  # the minimum of random draws
    m = make_tiny("llama", n_layers=4)
    with pytest.raises(MedmapError, match="unknown choice"):
        edit_test(m, EditTestConfig(choose=("best",)))
    with pytest.raises(MedmapError, match="out of range"):
        edit_test(m, EditTestConfig(k=4))


def test_cli_rejects_bad_options(tmp_path):
    from medmap.cli import main

    assert main(["edit-test", "-m", "x", "-o", str(tmp_path), "--k", "0"]) == 2
    assert main(["calibrate", "-m", "x", "-o", str(tmp_path), "--blocks", "a,b"]) == 2


def test_set_facts_keep_each_facts_own_answer_and_prompt():
    """Facts of a stratified subset: each fact's answer is one of its own target's accepted
    answers and its prompt is its own (rows matched by item and target, not by position)."""
    from medmap.concepts import load_concepts
    from medmap.experiments.edit_test import set_facts

    cs = load_concepts("animals")
    own = {(t.item_id, t.target_id): t for t in cs.targets()}
    facts, _ = set_facts(
        sharp_tiny(), "animals", max_items=6, max_distractors=3, seed=0, known_only=False
    )
    assert len({f.item_id for f in facts}) == 6
    for f in facts:
        t = own[(f.item_id, f.target_id)]
        assert f.answer in t.answers and f.prompt == t.prompt
        assert not ({d.strip().casefold() for d in f.distractors}
                    & {a.strip().casefold() for a in t.answers})  # fmt: skip
