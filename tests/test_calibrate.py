"""Planted-fact calibration (medmap.experiments.calibrate) on tiny random models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medmap.errors import MedmapError
from medmap.experiments.calibrate import (
    CalibrateConfig,
    calibrate,
    fact_known,
    fact_margins,
    load_planted_facts,
    localise,
    plant,
)
from medmap.experiments.scoring import answer_logprobs, mlp_params, restored
from medmap.model.sites import Trace, ablation_sites
from tiny import make_tiny


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: one intra-op thread is faster than two on a shared CPU (no spin-waiting)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sharp_tiny(arch: str = "llama", n_layers: int = 4):
    """A tiny model whose final-norm gain is ×30: at random init the unembedding caps every
    logit near ±1 (normed state of norm √64 × rows of norm 0.16), so no block could make any
    answer likely and nothing can be planted; the gain gives a real model's logit range."""
    m = make_tiny(arch, n_layers=n_layers)
    with torch.no_grad():
        m.adapter.final_norm.weight.mul_(30.0)
    return m


def test_answer_logprobs_match_forced_choice_scoring():
    from medmap.techniques.knowledge import score_candidates

    m = make_tiny("llama")
    prompts = ["Zorvetamine is used to treat", "The drug Quilaprex is indicated for"]
    answers = [" gout", " migraine attacks"]
    with torch.no_grad():
        ours = answer_logprobs(m, prompts, answers).numpy()
    ref = [f["logprob"].iloc[0] for f in score_candidates(m, prompts, [[a] for a in answers])]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_load_planted_facts_is_seeded_and_distinct():
    a, b = load_planted_facts(6, seed=1), load_planted_facts(6, seed=1)
    assert a == b and a != load_planted_facts(6, seed=2)
    assert len({f.answer for f in a}) == 6 and all(f.answer.startswith(" ") for f in a)
    assert not set(a[0].train) & set(a[0].heldout)  # held-out paraphrases are never trained on
    with pytest.raises(MedmapError):
        load_planted_facts(1)


def test_planted_fact_is_learned_and_lesioning_its_block_removes_it():
    m = sharp_tiny()
    facts = load_planted_facts(4)
    before = {k: v.clone() for k, v in m.hf.state_dict().items()}
    with restored(mlp_params(m, [1])):
        losses = plant(m, facts, 1, steps=40, lr=1e-2)
        assert losses[-1] < 0.05 * losses[0]
        assert fact_known(m, facts).tolist() == [1.0] * 4  # held-out paraphrases
        intact = fact_margins(m, facts)
        lesioned = {}
        for b in range(m.n_layers):
            with Trace(m.adapter, ablate=ablation_sites("mlp", [b])):
                lesioned[b] = (fact_known(m, facts).mean(), fact_margins(m, facts))
    # lesioning the planted block's MLP removes the facts; lesioning any other MLP keeps them
    assert lesioned[1][0] <= 0.5
    assert (intact - lesioned[1][1]).mean() > 10.0
    for b in (0, 2, 3):
        assert lesioned[b][0] == 1.0, b
        assert (intact - lesioned[b][1]).mean() < 2.0, b
    # the edit never outlives the context
    after = m.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_localise_subtracts_the_null_profile():
    blocks = range(4)
    edited = pd.DataFrame(
        {"technique": "lesion", "site": "mlp", "fact": 0, "block": blocks, "value": [9, 1, 5, 0]}
    )
    null = edited.assign(value=[8.5, 0, 0, 0])  # block 0 matters for everything (pitfall 10)
    row = localise(edited, null, planted_block=2).iloc[0]
    assert (row["found_block"], row["raw_block"], row["control_block"]) == (2, 0, 0)
    assert row["error_blocks"] == 0 and row["raw_error_blocks"] == -2
    assert row["peak_value"] == 5


def test_calibrate_end_to_end_finds_the_planted_block(tmp_path):
    m = sharp_tiny()
    cfg = CalibrateConfig(
        blocks=(1, 2), n_facts=3, steps=30, lr=2e-2, techniques=("lesion", "patching"),
        sites=("mlp",), control_set=None, n_boot=100,
    )  # fmt: skip
    table, summary, checks, prof = calibrate(m, cfg, tmp_path)
    assert len(table) == 2 * 2 * 3  # techniques × planted blocks × facts
    assert set(table.columns) >= {"technique", "site", "planted_block", "fact", "found_block",
                                  "error_blocks", "control_block", "learned", "drug"}  # fmt: skip
    les = table[(table["technique"] == "lesion") & table["learned"]]
    assert len(les) >= 3
    assert (les["found_block"] == les["planted_block"]).all()
    pat = table[(table["technique"] == "patching") & table["learned"]]
    assert len(pat) >= 3 and (pat["error_blocks"] == 0).mean() >= 0.6  # noisier than lesion
    assert list(checks["planted_block"]) == [1, 2]
    assert (checks["heldout_learned"] >= 0.5).all()
    s = summary.set_index(["technique", "site", "metric", "label"])
    acc = s.loc[("calibration_lesion", "mlp", "accuracy_pm1", "null_subtracted")]
    assert acc["value"] == 1.0 and acc["n"] == len(les)
    assert acc["baseline"] == pytest.approx(np.mean([3 / 4, 3 / 4]))  # blocks within ±1 of 1, 2
    assert set(prof["planted_block"]) == {-1, 1, 2}
    for name in ("calibration", "calibration_summary", "calibration_checks",
                 "calibration_profiles"):  # fmt: skip
        assert (tmp_path / f"{name}.parquet").exists()
    # a rerun reuses the finished cells and gives the same table
    again = calibrate(m, cfg, tmp_path)[0]
    pd.testing.assert_frame_equal(table, again)
    from medmap.experiments.report import calibration_section

    html = calibration_section(tmp_path, write=True)
    assert "Calibration: planted facts" in html and "data:image/png;base64," in html
    assert (tmp_path / "calibration.png").exists()


def test_calibrate_rejects_bad_settings():
    m = make_tiny("llama")
    with pytest.raises(MedmapError, match="out of range"):
        calibrate(m, CalibrateConfig(blocks=(7,)))
    with pytest.raises(MedmapError, match="unknown technique"):
        calibrate(m, CalibrateConfig(blocks=(1,), techniques=("umap",)))


def test_cli_calibrate_on_a_local_model_dir(tmp_path):
    from medmap.cli import main

    m = sharp_tiny()
    model_dir = tmp_path / "model"
    m.hf.save_pretrained(model_dir)
    m.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    args = ["calibrate", "-m", str(model_dir), "-o", str(out), "--blocks", "1", "--facts", "3",
            "--steps", "30", "--lr", "0.02", "--techniques", "lesion", "--sites", "mlp",
            "--control-set", "", "--n-boot", "50"]  # fmt: skip
    assert main(args) == 0
    table = pd.read_parquet(out / "calibration.parquet")
    assert len(table) == 3 and set(table["planted_block"]) == {1}
    assert (out / "calibration_section.html").exists()
    # the edit never reaches the model on disk
    from medmap.model.loading import load_model

    again = load_model(str(model_dir))
    for (k, v), w in zip(m.hf.state_dict().items(), again.hf.state_dict().values()):
        assert torch.equal(v, w), k
    assert main(args[:-2] + ["--n-boot", "50", "--blocks", "9"]) == 2  # block out of range


def test_calibrate_same_seed_same_tables():
    m = sharp_tiny()
    cfg = CalibrateConfig(blocks=(2,), n_facts=2, steps=10, lr=2e-2, techniques=("lesion",),
                          sites=("mlp",), control_set=None, n_boot=50)  # fmt: skip
    a, b = calibrate(m, cfg), calibrate(m, cfg)
    for x, y in zip(a, b):
        pd.testing.assert_frame_equal(x, y)
