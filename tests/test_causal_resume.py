"""Interrupted causal runs resume from their finished cells and end with identical results."""

from __future__ import annotations

import pandas as pd
import pytest

from medmap.run.cells import CellCache
from medmap.techniques import lesion, patch, saliency_items
from tiny import make_tiny

PROMPTS = [
    "A 47-year-old woman presents with",
    "Metformin is a first-line treatment for",
    "The capital of France is",
    "An 80-year-old man has",
    "A dog is a",
]
TARGETS = [" chest pain", " type 2 diabetes", " Paris", " shortness of breath", " mammal"]
CLEAN = ["A 47-year-old woman presents with", "The patient took insulin for", "A dog is a"]
CORRUPT = ["A 80-year-old woman presents with", "The patient took aspirin for", "A cat is a"]
CLEAN_ANS = [" chest pain", " diabetes", " mammal"]
CORRUPT_ANS = [" shortness", " pain", " pet"]


class Killed(Exception):
    """Simulated kill of the process after some cells were written."""


def _run_killed_then_resumed(
    monkeypatch, run, cache_dir, kill_after: int
) -> tuple[pd.DataFrame, int]:
    real_put = CellCache.put
    calls = {"n": 0}

    def dying_put(self, key, df):
        if calls["n"] == kill_after:
            raise Killed
        calls["n"] += 1
        return real_put(self, key, df)

    monkeypatch.setattr(CellCache, "put", dying_put)
    with pytest.raises(Killed):
        run(cache_dir)
    assert len(list(cache_dir.glob("*.parquet"))) == kill_after
    assert not list(cache_dir.glob(".*"))  # no partial files
    monkeypatch.setattr(CellCache, "put", real_put)
    written = {"n": 0}

    def counting_put(self, key, df):
        written["n"] += 1
        return real_put(self, key, df)

    monkeypatch.setattr(CellCache, "put", counting_put)
    out = run(cache_dir)
    monkeypatch.setattr(CellCache, "put", real_put)
    return out, written["n"]


def test_lesion_resume(monkeypatch, tmp_path):
    model = make_tiny("llama", seed=20)
    run = lambda d: lesion(model, PROMPTS, TARGETS, batch_size=2, concept_set="x", cache_dir=d)
    resumed, fresh_cells = _run_killed_then_resumed(monkeypatch, run, tmp_path / "c", 4)
    total = 3 * 3  # 3 chunks of items × 3 layers
    assert fresh_cells == total - 4
    pd.testing.assert_frame_equal(resumed, run(None))
    # a third run computes nothing
    assert len(list((tmp_path / "c").glob("*.parquet"))) == total
    pd.testing.assert_frame_equal(run(tmp_path / "c"), resumed)


def test_patching_resume(monkeypatch, tmp_path):
    model = make_tiny("gemma3_text", seed=21)
    run = lambda d: patch(
        model,
        CLEAN,
        CORRUPT,
        CLEAN_ANS,
        CORRUPT_ANS,
        positions=["last", "all"],
        batch_size=2,
        cache_dir=d,
    )
    resumed, fresh_cells = _run_killed_then_resumed(monkeypatch, run, tmp_path / "p", 3)
    assert fresh_cells == 2 * 4 - 3  # 2 chunks × 4 residual layers
    pd.testing.assert_frame_equal(resumed, run(None))


def test_saliency_resume(monkeypatch, tmp_path):
    model = make_tiny("gpt2", seed=22)
    model.hf.requires_grad_(False)  # as load_model leaves it
    run = lambda d: saliency_items(model, PROMPTS, TARGETS, batch_size=2, cache_dir=d)
    resumed, fresh_cells = _run_killed_then_resumed(monkeypatch, run, tmp_path / "s", 1)
    assert fresh_cells == 2
    pd.testing.assert_frame_equal(resumed, run(None))
    assert all(p.grad is None and not p.requires_grad for p in model.hf.parameters())


def test_changed_arguments_do_not_reuse_cells(tmp_path):
    model = make_tiny("llama", seed=23)
    a = lesion(model, PROMPTS[:2], TARGETS[:2], layers=[1], cache_dir=tmp_path)
    b = lesion(model, PROMPTS[:2], [" x", " y"], layers=[1], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.parquet"))) == 2
    assert not (a["nll_base"].to_numpy() == b["nll_base"].to_numpy()).any()


# --- the CLI (fake concept set, tiny model): writes tidy + detail parquet, resumes from cells ---


class _Target:
    def __init__(self, i, prompt, answer, span):
        self.item_id, self.item_index, self.target_id = f"it{i}", i, "t"
        self.prompt, self.answers, self.span = prompt, [answer, " other"], span


class _FakeSet:
    name = "fake"

    def __init__(self, max_items=None):
        self.max_items = max_items

    def targets(self):
        out = [_Target(i, p, t, (0, 1)) for i, (p, t) in enumerate(zip(PROMPTS, TARGETS))]
        return out[: self.max_items]


class _Pair:
    def __init__(self, i):
        s = CLEAN[i].index(" ") + 1
        e = CLEAN[i].index(" ", s)
        self.clean = _Target(i, CLEAN[i], CLEAN_ANS[i], (s, e))
        self.corrupt = _Target(i + 10, CORRUPT[i], CORRUPT_ANS[i], (s, s + e - s))
        self.clean_answer, self.corrupt_answer = CLEAN_ANS[i], CORRUPT_ANS[i]


@pytest.fixture
def fake_cli(monkeypatch):
    import sys
    import types

    import medmap.run.execute as ex
    import medmap.run.runner as rr
    from medmap.techniques.base import RunContext

    # The commands run through the runner: give it the tiny model and the fake set.
    model = make_tiny("llama", seed=30)
    monkeypatch.setattr(rr, "preflight", lambda cfg, load: None)
    monkeypatch.setattr(ex, "model_for", lambda cfg: model)
    monkeypatch.setattr(ex, "concept_sets_for", lambda cfg: ["fake"])
    monkeypatch.setattr(ex, "_set_name", lambda spec: "fake")
    monkeypatch.setattr(
        RunContext, "causal_set", lambda self, spec, t: _FakeSet(self.config.max_items)
    )

    def choices(self, spec):  # one answer each, no distractor: NLL lesions, no margin saliency
        from medmap.techniques.knowledge import Choice

        return {
            f"{t.item_id}/{t.target_id}": Choice((t.answers[0],), ())
            for t in _FakeSet(None).targets()
        }

    monkeypatch.setattr(RunContext, "choices", choices)
    import medmap.techniques.knowledge  # noqa: F401  (imported before the fake module below)

    fake = types.ModuleType("medmap.concepts")
    fake.counterfactual_pairs = lambda cs, tok, max_pairs, seed: [_Pair(i) for i in range(3)][
        :max_pairs
    ]
    monkeypatch.setitem(sys.modules, "medmap.concepts", fake)
    return model


def test_cli_lesion_writes_tables_and_resumes(fake_cli, tmp_path):
    from medmap.cli import main

    out = tmp_path / "les"
    args = ["lesion", "--model", "x", "--concepts", "fake", "--max-items", "4", "--out", str(out)]
    assert main([*args, "--n-boot", "20"]) == 0
    tidy = pd.read_parquet(out / "results.parquet")
    items = pd.read_parquet(out / "items.parquet")
    # the lesion metrics and the map row's split-half stability
    assert set(tidy["metric"]) == {"delta_nll", "delta_top1", "delta_topk", "map_split_half"}
    assert (tidy["concept_set"] == "fake").all()
    assert sorted(items["item_id"].unique()) == ["it0/t", "it1/t", "it2/t", "it3/t"]
    n_cells = len(list((out / "cells" / "lesion" / "fake").glob("lesion-*.parquet")))
    assert n_cells == 3  # one chunk of 4 items × 3 layers
    assert (out / "manifest.json").exists() and not (out / ".lock").exists()
    assert main([*args, "--n-boot", "20"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), tidy)


def test_cli_saliency_and_patch(fake_cli, tmp_path):
    from medmap.cli import main

    assert (
        main(
            [
                "saliency",
                "-m",
                "x",
                "-c",
                "fake",
                "--max-items",
                "2",
                "-o",
                str(tmp_path / "s"),
                "--n-boot",
                "20",
            ]
        )
        == 0
    )
    sal = pd.read_parquet(tmp_path / "s" / "results.parquet")
    # 2 items: too few for split halves, so no stability row
    assert "block" in set(sal["module"]) and (sal["technique"] == "saliency").all()
    assert (
        main(
            [
                "patch",
                "-m",
                "x",
                "-c",
                "fake",
                "--positions",
                "last,concept",
                "--max-pairs",
                "2",
                "-o",
                str(tmp_path / "p"),
                "--n-boot",
                "20",
            ]
        )
        == 0
    )
    pt = pd.read_parquet(tmp_path / "p" / "results.parquet")
    assert set(pt["position"]) == {"last", "concept"} and set(pt["metric"]) == {"restored"}
    det = pd.read_parquet(tmp_path / "p" / "items.parquet")
    assert det["pair"].nunique() == 2
    # user error → exit code 2
    assert (
        main(["patch", "-m", "x", "-c", "fake", "--positions", "first", "-o", str(tmp_path / "q")])
        == 2
    )


def test_concept_wrappers_return_tidy_rows(fake_cli):
    from medmap.techniques import lesion_concepts, patch_concepts, weight_saliency_concepts

    cs = _FakeSet()
    les = lesion_concepts(fake_cli, cs, max_items=2, layers=[1], n_boot=20)
    assert set(les["layer"]) == {1} and (les["n"] == 2).all()
    sal = weight_saliency_concepts(fake_cli, cs, max_items=1, n_boot=20)
    assert (sal["n"] == 1).all()
    pt = patch_concepts(fake_cli, cs, max_pairs=3, layers=[0, 3], n_boot=20)
    assert set(pt["position"]) == {"last", "concept"} and set(pt["layer"]) == {0, 3}
