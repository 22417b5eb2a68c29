"""The package installs from its wheel with every data file medmap loads.

Builds the wheel from this checkout (offline, no build isolation), checks that every non-Python
file under ``src/medmap`` is inside it, then installs it into a scratch directory and, in a fresh
interpreter that cannot see ``src/``, loads every bundled concept set, every preset and the
report assets from the installed copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "medmap"


def _data_files() -> list[str]:
    out = []
    for p in SRC.rglob("*"):
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts:
            out.append("medmap/" + p.relative_to(SRC).as_posix())
    return sorted(out)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # build from a copy: an in-tree build leaves build/ in the checkout (stale files would ride along)
    tree = tmp_path_factory.mktemp("tree")
    shutil.copytree(
        ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(tree),
        ],
        check=True,
        capture_output=True,
        cwd=out,
    )
    (whl,) = out.glob("medmap-*.whl")
    return whl


def test_every_data_file_is_in_the_wheel(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    data = _data_files()
    assert len(data) >= 15  # concept sets, presets, report assets, model shapes ...
    missing = [f for f in data if f not in names]
    assert not missing, f"data files left out of the wheel (add them to package-data): {missing}"


def test_installed_wheel_loads_its_data(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = r"""
import sys, pathlib
import medmap
assert pathlib.Path(medmap.__file__).is_relative_to(pathlib.Path(sys.argv[1])), medmap.__file__
from medmap.concepts import list_concepts, load_concepts
names = list_concepts()
for n in names:
    assert len(load_concepts(n).items) > 0, n
from medmap.run.config import preset as load_preset
from importlib import resources
presets = [p.name[:-5] for p in resources.files("medmap.run.presets").iterdir() if p.name.endswith(".toml")]
for p in presets:
    load_preset(p)
report = [p.name for p in resources.files("medmap.report").iterdir()]
print(len(names), sorted(presets), len(report))
"""
    env = {"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-c", code, str(target)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    n_sets, presets = r.stdout.split(" ", 1)
    assert int(n_sets) >= 10
    assert "'quick'" in presets and "'standard'" in presets
