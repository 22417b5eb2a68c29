"""Out-of-memory back-off in the lesion and patching sweeps (medmap.techniques.sweep).

A chunk that runs out of memory is recomputed in halved micro-batches; its cells keep the keys
of the chunk (so a resumed run finds them) and are stored only once every micro-batch is done.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medmap.errors import MedmapError
from medmap.model.sites import count_hooks
from medmap.techniques import lesion, patch
from oom import oom_above
from tiny import make_tiny

PROMPTS = [
    "Metformin is a first-line treatment for",
    "A 47-year-old woman presents with chest pain radiating to the left arm and",
    "The capital of France is",
    "An 80-year-old man has shortness of breath and",
    "Atorvastatin is a statin used for high",
    "Stage G3a chronic kidney disease progresses to stage",
] * 2
TARGETS = [" type 2 diabetes", " sweating", " Paris", " swollen ankles", " cholesterol", " G4"] * 2


def _cells(d) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_lesion_backs_off_with_the_same_results_and_cells(tmp_path, monkeypatch):
    m = make_tiny("llama", n_layers=3)
    ref8 = lesion(m, PROMPTS, TARGETS, batch_size=8)
    ref2 = lesion(m, PROMPTS, TARGETS, batch_size=2)
    hooks = count_hooks(m.hf)
    calls = oom_above(m, 2, monkeypatch)
    got = lesion(m, PROMPTS, TARGETS, batch_size=8, cache_dir=tmp_path / "c")
    # chunk 0 (8 items): 8 -> 4 -> 2, then micro-batches of 2; chunk 1 (4 items) starts at 2
    assert calls[:3] == [8, 4, 2] and set(calls[3:]) == {2}
    assert len(calls) == 3 + 3 + 2
    cols = ["nll_base", "nll_lesioned", "top1_lesioned", "topk_lesioned"]
    pd.testing.assert_frame_equal(got[cols], ref2[cols])  # the same batches: bit-identical
    np.testing.assert_allclose(got["nll_lesioned"], ref8["nll_lesioned"], rtol=1e-5, atol=1e-5)
    assert list(got["item"]) == list(ref8["item"]) and list(got["layer"]) == list(ref8["layer"])
    assert count_hooks(m.hf) == hooks
    # the cells are the batch-size-8 chunks' cells: a run without OOM recomputes nothing
    assert len(_cells(tmp_path / "c")) == 2 * 3
    monkeypatch.undo()
    calls = oom_above(m, 10**6, monkeypatch)
    again = lesion(m, PROMPTS, TARGETS, batch_size=8, cache_dir=tmp_path / "c")
    assert calls == []
    pd.testing.assert_frame_equal(again, got)


def test_patching_backs_off_with_the_same_results(tmp_path, monkeypatch):
    m = make_tiny("qwen2", n_layers=3)
    clean = ["The patient is 47 years old."] * 6
    corrupt = ["The patient is 80 years old."] * 6
    assert len(m.tokenizer(clean[0])["input_ids"]) == len(m.tokenizer(corrupt[0])["input_ids"])
    kw = dict(
        clean_prompts=clean,
        corrupt_prompts=corrupt,
        clean_targets=[" chest"] * 6,
        corrupt_targets=[" breath"] * 6,
        positions=["last", "all"],
        batch_size=4,
    )
    ref = patch(m, **kw)
    calls = oom_above(m, 1, monkeypatch)
    got = patch(m, **kw, cache_dir=tmp_path / "c")
    # the clean run fails at 4 and 2; from then on clean and corrupt runs of one pair each
    assert calls[:2] == [4, 2] and set(calls[2:]) == {1} and len(calls) == 2 + 2 * 6
    for col in ("logit_diff_patched", "logit_diff_clean", "logit_diff_corrupt"):
        np.testing.assert_allclose(got[col], ref[col], rtol=1e-5, atol=1e-5)
    # restored divides by the clean-corrupt gap, which float noise of 1e-6 cannot move by 1e-4
    np.testing.assert_allclose(got["restored"], ref["restored"], atol=1e-4)
    assert list(got["pair"]) == list(ref["pair"]) and list(got["layer"]) == list(ref["layer"])
    assert len(_cells(tmp_path / "c")) == 2 * (m.n_layers + 1)


def test_out_of_memory_with_one_item_is_a_clear_error(tmp_path, monkeypatch):
    m = make_tiny("llama")
    oom_above(m, 0, monkeypatch)
    with pytest.raises(MedmapError, match=r"out of memory with a batch of 1 item \(item 0\)"):
        lesion(m, PROMPTS[:3], TARGETS[:3], batch_size=2, cache_dir=tmp_path / "c")
    assert _cells(tmp_path / "c") == []


def test_interrupted_micro_batched_chunk_stores_no_partial_cell(tmp_path, monkeypatch):
    """A cell built from micro-batches is written only when all of them are done."""
    m = make_tiny("llama")
    # 6, 3 (OOM), 1 (done), then the interrupt in the 2nd micro-batch
    calls = oom_above(m, 2, monkeypatch, interrupt_at=4)
    with pytest.raises(KeyboardInterrupt):
        lesion(m, PROMPTS[:6], TARGETS[:6], batch_size=6, cache_dir=tmp_path / "c")
    assert calls == [6, 3, 1, 1]
    assert _cells(tmp_path / "c") == []
