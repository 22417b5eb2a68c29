"""Run configs (presets, TOML, validation) and run directories (lock, resume bookkeeping)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from medmap.analysis.results import make_rows
from medmap.errors import ConfigError, MedmapError
from medmap.run.config import RunConfig, build_config, preset
from medmap.run.rundir import RunDir, RunLock


def test_presets_validate_and_differ():
    quick, standard, full = (build_config(preset_name=p) for p in ("quick", "standard", "full"))
    assert quick.max_items < standard.max_items and full.max_items is None
    assert quick.n_boot < full.n_boot and full.dtype == "bfloat16"
    assert set(preset("quick")) <= set(RunConfig.model_fields)


def test_precedence_preset_file_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('max_items = 7\nseed = 3\ntechniques = ["umap", "lesion"]\n')
    cfg = build_config(preset_name="quick", config_file=f, seed=11, model=None)
    # a known-only run with a causal stage brings its knows stage
    assert (cfg.max_items, cfg.seed, cfg.techniques) == (7, 11, ["knows", "umap", "lesion"])
    assert cfg.n_boot == preset("quick")["n_boot"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_itemz = 3\n", "'max_itemz': unknown key"),
        ('max_items = "many"\n', "'max_items': Input should be a valid integer"),
        ('techniques = ["umap", "xray"]\n', "'techniques.1'"),
        ("max_items = [\n", "not valid TOML"),
        ('dtype = "float8"\n', "'dtype'"),
        ("batch_size = 0\n", "'batch_size'"),
    ],
)
def test_bad_configs(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        build_config(config_file=f)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(config_file=tmp_path / "missing.toml")
    f = tmp_path / "latin1.toml"
    f.write_bytes("model = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        build_config(config_file=f)
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        build_config(preset_name="fast")


def test_lock_excludes_second_run_and_detects_stale(tmp_path):
    with RunLock(tmp_path):
        other = {"pid": os.getpid(), "host": json.loads((tmp_path / ".lock").read_text())["host"]}
        assert json.loads((tmp_path / ".lock").read_text()) == other
        with (
            pytest.raises(MedmapError, match="being written by another medmap run"),
            RunLock(tmp_path),
        ):
            pass
    assert not (tmp_path / ".lock").exists()
    # A lock left by a process that no longer exists is stale and taken over.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": other["host"]}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_rundir_cells_and_config_mismatch(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare({"model": "a", "seed": 0})
    assert not run.done("lesion", "drugs")
    df = make_rows(
        [
            {
                "model": "a",
                "layer": 1,
                "relative_depth": 0.5,
                "concept_set": "drugs",
                "technique": "lesion",
                "metric": "delta_nll",
                "value": 0.25,
            }
        ]
    )
    run.write_cell("lesion", "drugs", df, seconds=1.5)
    assert run.done("lesion", "drugs")
    pd.testing.assert_frame_equal(run.read_cell("lesion", "drugs"), df)
    assert run.stage_seconds() == {"lesion": 1.5}
    run.prepare({"model": "a", "seed": 0})  # same config: resumable
    with pytest.raises(MedmapError, match="different config .*differs in seed"):
        RunDir(tmp_path / "run").prepare({"model": "a", "seed": 1})


def test_unwritable_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits; use a path under a file
            target = tmp_path / "file.txt"
            target.write_text("x")
            bad = target / "run"
        else:
            bad = ro / "run"
        with pytest.raises(MedmapError, match="is not writable"):
            RunDir(bad).prepare({})
    finally:
        ro.chmod(0o700)


def test_paper_configs_validate():
    from pathlib import Path

    paper = sorted(
        p
        for p in (Path(__file__).parents[1] / "configs" / "paper").glob("*.toml")
        if p.name != "sweep.toml"
    )
    assert len(paper) == 13  # the paper's 5 models, Llama-3.1-8B, Qwen2.5-32B, 6 medical models
    models = set()
    for f in paper:
        cfg = build_config(preset_name="full", config_file=f)
        assert cfg.dtype == "bfloat16" and cfg.device_map == "auto" and "cpu" in cfg.max_memory
        models.add(cfg.model)
    assert {
        "meta-llama/Llama-3.3-70B-Instruct",
        "google/gemma-3-27b-it",
        "google/medgemma-27b-text-it",
        "Qwen/Qwen2.5-32B-Instruct",
        "Qwen/Qwen3-32B",
        "openai/gpt-oss-120b",
        "aaditya/Llama3-OpenBioLLM-70B",
        "axiong/PMC_LLaMA_13B",
        "wanglab/ClinicalCamel-70B",
        "Writer/Palmyra-Med-70B-32K",
        "epfl-llm/meditron-70b",
        "FreedomIntelligence/HuatuoGPT-o1-70B",
    } <= models
