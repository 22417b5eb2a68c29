"""`medmap map` end to end on a tiny model: determinism, kill -9 at every stage then resume,
the run lock, and Ray (2 local CPU workers) giving the same table as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from medmap.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """\
model = "{model}"
concept_sets = ["progression", "diseases"]
max_items = 10
max_templates = 2
n_boot = 20
saliency_items = 4
max_pairs = 6
batch_size = 8
min_known = 1
generic_sentences = 16
"""
# known_only (the default): a random tiny model "knows" targets at chance, so the causal stages
# run on those; min_known = 1 keeps every set mapped


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    from tiny import make_hf, tokenizer

    d = tmp_path_factory.mktemp("tiny-llama")
    make_hf("llama", n_layers=4).save_pretrained(d)
    tokenizer().save_pretrained(d)
    cfg = d / "run.toml"
    cfg.write_text(CONFIG.format(model=d), encoding="utf-8")
    return cfg


def _cmd(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "medmap.cli", "map", "--config", str(cfg), "--out", str(out)]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


def _table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet")


@pytest.fixture(scope="module")
def reference(run_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = subprocess.run(_cmd(run_config, out), env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_run_directory_is_complete(reference):
    for f in ("results.parquet", "umap_coords.parquet", "report.html", "manifest.json"):
        assert (reference / f).stat().st_size > 0, f
    t = _table(reference)
    assert set(t.technique) >= {"umap", "probe", "saliency", "lesion", "patching"}
    assert set(t.concept_set) == {"progression", "diseases"}
    assert (t.loc[t.layer >= 0, "relative_depth"] == t.loc[t.layer >= 0, "layer"] / 4).all()
    m = json.loads((reference / "manifest.json").read_text())
    assert m["n_layers"] == 4 and len(m["weights_hash"]) == 64
    assert set(m["stages"]) == {"knows", "umap", "saliency", "lesion", "patching"}
    assert m["config"]["max_items"] == 10 and m["rows"] == len(t)
    assert {"torch", "transformers", "medmap"} <= set(m["versions"])
    assert not (reference / ".lock").exists()
    assert list(reference.rglob("*.tmp")) == []


def test_same_seed_same_table_in_process(run_config, reference, tmp_path):
    import torch

    from medmap.run.config import build_config
    from medmap.run.runner import run_map

    cfg = build_config(config_file=run_config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference (OMP_NUM_THREADS=1): same summation order
    try:
        out = run_map(cfg, tmp_path / "again", report=False)
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(_table(out), _table(reference))


def _kill_when(cfg: Path, out: Path, ready) -> bool:
    """Start `medmap map`, SIGKILL it as soon as ``ready(out)`` holds; True if it was killed."""
    proc = subprocess.Popen(
        _cmd(cfg, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(out):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _n(out: Path, pattern: str) -> int:
    return len(list(out.glob(pattern)))


KILL_POINTS = {
    "capture": lambda o: _n(o, "activations/*") >= 1,
    "umap": lambda o: _n(o, "parts/umap/*.parquet") >= 1,
    "saliency": lambda o: _n(o, "parts/umap/*.parquet") >= 2,
    "lesion": lambda o: _n(o, "cells/lesion/*/*") >= 1,
    "patching": lambda o: _n(o, "cells/patching/*/*") >= 1,
    "report": lambda o: (o / "results.parquet").exists(),
}


def test_kill_minus_nine_at_every_stage_then_resume(run_config, reference, tmp_path):
    out = tmp_path / "run"
    killed = [name for name, ready in KILL_POINTS.items() if _kill_when(run_config, out, ready)]
    # each kill happens in a later stage than the previous one; most points must be hit
    assert len(killed) >= 4, killed
    assert (out / ".lock").exists() or killed[-1] == "report"  # stale lock of a dead pid
    proc = subprocess.run(_cmd(run_config, out), env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pd.testing.assert_frame_equal(_table(out), _table(reference))
    assert (out / "report.html").exists()
    assert list(out.rglob("*.tmp")) == []


def test_live_lock_and_changed_config_are_refused(run_config, reference, tmp_path, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    assert main(["map", "--config", str(run_config), "--out", str(out)]) == 2
    assert "being written by another medmap run" in capsys.readouterr().err
    (out / ".lock").unlink()
    assert main(["map", "--config", str(run_config), "--out", str(reference), "--seed", "7"]) == 2
    assert "different config (differs in seed)" in capsys.readouterr().err.replace("\n", " ")


@pytest.mark.timeout(900)
def test_ray_two_local_workers_same_table(run_config, reference, tmp_path):
    pytest.importorskip("ray")
    import ray

    from medmap.run.config import build_config
    from medmap.run.ray import run_cells_on_ray  # noqa: F401  (import check)
    from medmap.run.runner import run_map

    cfg = build_config(config_file=run_config)
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}},
        )
        out = run_map(cfg, tmp_path / "ray", report=False, ray_address="local")
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(_table(out), _table(reference))


def test_merge_coords_makes_mixed_label_columns_text():
    from medmap.run.runner import merge_coords

    a = pd.DataFrame({"concept_set": ["ages"] * 2, "x": [0.0, 1.0], "decade": [4, 5]})
    b = pd.DataFrame({"concept_set": ["years"] * 2, "x": [2.0, 3.0], "decade": ["1940s", "1950s"]})
    m = merge_coords([a, b])
    assert list(m["decade"]) == ["4", "5", "1940s", "1950s"]
    assert m["x"].dtype == float
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"coords-{os.getpid()}.parquet"
    m.to_parquet(path)  # one type per column: Parquet accepts it
    path.unlink()


RETRY_CONFIG = """\
model = "{model}"
concept_sets = ["progression"]
techniques = ["saliency", "lesion"]
known_only = false
max_items = 6
saliency_items = 3
n_boot = 20
batch_size = 8
"""


@pytest.mark.timeout(900)
def test_ray_retries_failed_and_crashed_tasks(run_config, tmp_path):
    """A task that raises and a task whose worker dies are retried; the table is unchanged.

    Then a task that fails on every attempt ends the run with a one-line error naming the cell
    after 1 + max_retries attempts, and the run is not marked finished.
    """
    pytest.importorskip("ray")
    import ray

    from medmap.errors import MedmapError
    from medmap.run.config import build_config
    from medmap.run.runner import run_map

    cfg_file = tmp_path / "retry.toml"
    model_dir = run_config.parent
    cfg_file.write_text(RETRY_CONFIG.format(model=model_dir), encoding="utf-8")
    cfg = build_config(config_file=cfg_file)
    ref = run_map(cfg, tmp_path / "ref", report=False)  # one process, no faults
    faults = tmp_path / "faults"
    faults.mkdir()
    plan = faults / "plan.json"
    plan.write_text(json.dumps({"lesion": "raise-once", "saliency": "crash-once"}))
    env = {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MEDMAP_TEST_FAULTS": str(faults),
        "PYTHONPATH": str(ROOT / "tests"),
    }
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env, "worker_process_setup_hook": "ray_faults.install"},
        )
        out = run_map(cfg, tmp_path / "ray", report=False, ray_address="local")
        attempts = {p.name: p.read_text().split() for p in faults.glob("*.attempts")}
        assert sorted(attempts) == ["lesion-progression.attempts", "saliency-progression.attempts"]
        assert all(len(pids) == 2 for pids in attempts.values())
        crashed = attempts["saliency-progression.attempts"]
        assert crashed[0] != crashed[1]  # the retry ran in a new worker process
        pd.testing.assert_frame_equal(_table(out), _table(ref))

        plan.write_text(json.dumps({"lesion": "always"}))
        for p in faults.glob("*.attempts"):
            p.unlink()
        with pytest.raises(MedmapError) as e:
            run_map(cfg, tmp_path / "ray-fail", report=False, ray_address="local")
    finally:
        ray.shutdown()
    msg = str(e.value)
    assert "cell lesion/progression" in msg and "failed after 2 retries" in msg
    assert "injected fault in lesion/progression, attempt 3" in msg and "\n" not in msg
    assert len((faults / "lesion-progression.attempts").read_text().split()) == 3
    assert not (tmp_path / "ray-fail" / "results.parquet").exists()
