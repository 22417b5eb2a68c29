"""Known facts only (issue 15 item 4): the knows stage runs first and the causal stages use
exactly the targets it found known; a set with too few is reported, not mapped."""

from __future__ import annotations

import pandas as pd
import pytest

CONFIG = dict(
    concept_sets=["diseases"],
    max_targets=1,
    n_boot=10,
    saliency_items=2,
    max_pairs=4,
    batch_size=8,
    generic_sentences=8,
    umap=False,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import make_hf, tokenizer

    d = tmp_path_factory.mktemp("tiny-llama-known")
    make_hf("llama", n_layers=2).save_pretrained(d)
    tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def known_run(tiny_dir, tmp_path_factory):
    from medmap.run.config import RunConfig
    from medmap.run.runner import run_map

    # a random model "knows" targets at chance: enough of them to map with min_known = 2
    cfg = RunConfig(model=str(tiny_dir), techniques=["lesion", "patching"], min_known=2, **CONFIG)
    assert cfg.techniques == ["knows", "lesion", "patching"]  # brought in by known_only
    out = run_map(cfg, tmp_path_factory.mktemp("known") / "run", report=True, item_detail=True)
    return cfg, out


def test_causal_stages_use_exactly_the_known_targets(known_run):
    cfg, out = known_run
    kn = pd.read_parquet(out / "knows.parquet")
    known = {f"{i}/{t}" for i, t, k in zip(kn["item_id"], kn["target_id"], kn["known"]) if k}
    assert 2 <= len(known) < len(kn)  # some known, some not: the filter has work to do
    items = pd.read_parquet(out / "items.parquet")
    lesioned = set(items.loc[items["delta_margin"].notna(), "item_id"])
    assert lesioned == known
    # the margin lesioned is the knows stage's margin for every target, intact model
    les = items[items["layer"] == 1].set_index("item_id")
    kn = kn.assign(key=kn["item_id"] + "/" + kn["target_id"]).set_index("key")
    for key in known:
        assert les.loc[key, "margin_base"] == pytest.approx(kn.loc[key, "margin"], abs=1e-4)
        assert les.loc[key, "margin_base"] > 0
    # patching pairs: both prompts are known targets
    pairs = items.loc[items["pair_id"].notna(), "pair_id"].unique() if "pair_id" in items else []
    assert len(pairs) > 0
    for p in pairs:
        clean, rest = p.split(">")
        corrupt, tid = rest.split("/")
        assert f"{clean}/{tid}" in known and f"{corrupt}/{tid}" in known
    # the table holds the number kept per set
    t = pd.read_parquet(out / "results.parquet")
    n_known = t[(t["technique"] == "knows") & (t["metric"] == "n_known")]
    assert n_known["value"].tolist() == [len(known)]


def test_too_few_known_facts_is_reported_not_mapped(tiny_dir, tmp_path):
    from medmap.run.config import RunConfig
    from medmap.run.runner import run_map

    cfg = RunConfig(model=str(tiny_dir), techniques=["lesion"], min_known=10_000, **CONFIG)
    out = run_map(cfg, tmp_path / "run", report=True)
    t = pd.read_parquet(out / "results.parquet")
    assert not (t["technique"] == "lesion").any()
    few = t[(t["technique"] == "knows") & (t["metric"] == "too_few_known")]
    assert few["value"].tolist() == [1.0]
    km = pd.read_parquet(out / "knowledge_map.parquet")
    assert not (km["map"] == "lesion").any()
    html = (out / "report.html").read_text()
    assert "too few known facts" in html and "Known facts" in html


def test_single_technique_commands_use_every_item_by_default(tiny_dir, tmp_path):
    from medmap.cli import main

    out = tmp_path / "les"
    argv = ["lesion", "-m", str(tiny_dir), "-c", "progression", "--max-items", "4"]
    assert main([*argv, "--n-boot", "10", "--out", str(out)]) == 0
    t = pd.read_parquet(out / "results.parquet")
    assert "lesion" in set(t["technique"]) and "knows" not in set(t["technique"])
    out2 = tmp_path / "les-known"
    assert main([*argv, "--n-boot", "10", "--known-only", "--out", str(out2)]) in (0,)
    t2 = pd.read_parquet(out2 / "results.parquet")
    assert "knows" in set(t2["technique"])
