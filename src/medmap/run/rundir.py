"""A run directory: every path of a run, its exclusive lock and its finished cells.

Layout (every path is named once, in :class:`Run`)::

    RUN_DIR/.lock                          pid and host of the run writing here
    RUN_DIR/config.json                    the validated config (a re-run must match it)
    RUN_DIR/model.json                     the model's identity and shape, written by the cells
    RUN_DIR/parts/<technique>/<set>.parquet   one finished (technique, set) cell, tidy rows
    RUN_DIR/parts/<technique>/<set>.json      its metadata (seconds taken)
    RUN_DIR/parts/umap_coords/<set>.parquet   UMAP coordinates of one set
    RUN_DIR/parts/items/<technique>/<set>.parquet  per-item detail of one cell (if any)
    RUN_DIR/parts/knows_items/<set>.parquet    the knows stage's per-target forced choice
    RUN_DIR/parts/started.txt              when the run first started
    RUN_DIR/cells/<technique>/<set>/       the sweeps' content-keyed sub-cells (chunk × layer)
    RUN_DIR/activations/<set>/             activation stores of the representation maps
    RUN_DIR/results.parquet                every cell merged (the tidy results table)
    RUN_DIR/umap_coords.parquet            every set's UMAP coordinates
    RUN_DIR/items.parquet                  per-item detail (single-technique commands)
    RUN_DIR/knows.parquet                  every set's per-target forced choice (knows stage)
    RUN_DIR/knowledge_map.parquet          tidy knowledge-map rows (analysis.maps.build_outputs)
    RUN_DIR/findings.parquet               the findings (analysis.maps.build_outputs)
    RUN_DIR/specificity_map.parquet        medical minus matched control (analysis.specificity)
    RUN_DIR/paper_table.parquet            the paper's Table 1 (analysis.findings.paper_table)
    RUN_DIR/paper_intervals.parquet        the paper's interval map (findings.paper_intervals)
    RUN_DIR/manifest.json                  provenance of the finished run
    RUN_DIR/report.html, RUN_DIR/figures/  the report (report.html.build_report)

A cell that exists is finished: a resumed run skips it. Nothing else marks progress.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pandas as pd

from medmap.errors import MedmapError
from medmap.run.cells import CellStore
from medmap.run.outputs import write_json_atomic  # noqa: F401  (re-exported)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock on a run directory; a stale lock of a dead process is taken over."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"

    def __enter__(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    other = {}
                pid, host = int(other.get("pid", -1)), other.get("host")
                if host == me["host"] and pid > 0 and not _pid_alive(pid):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                if host != me["host"] or pid > 0:
                    raise MedmapError(
                        f"{self.path.parent} is being written by another medmap run (pid {pid} on {host})",
                        hint="wait for it, or choose another --out directory; delete .lock only if that run is dead",
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise MedmapError(f"cannot lock {self.path.parent}")

    def __exit__(self, *exc) -> bool:
        self.path.unlink(missing_ok=True)
        return False


class Run:
    """One run directory: owns every path of the layout above and the finished cells."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    # -- paths (the only place they are spelled) --------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    @property
    def model_info_path(self) -> Path:
        return self.path / "model.json"

    @property
    def parts(self) -> Path:
        return self.path / "parts"

    @property
    def started_path(self) -> Path:
        return self.parts / "started.txt"

    @property
    def results(self) -> Path:
        return self.path / "results.parquet"

    @property
    def umap_coords(self) -> Path:
        return self.path / "umap_coords.parquet"

    @property
    def items(self) -> Path:
        return self.path / "items.parquet"

    @property
    def knows(self) -> Path:
        return self.path / "knows.parquet"

    @property
    def knowledge_map(self) -> Path:
        return self.path / "knowledge_map.parquet"

    @property
    def paper_table(self) -> Path:
        return self.path / "paper_table.parquet"

    @property
    def paper_intervals(self) -> Path:
        return self.path / "paper_intervals.parquet"

    @property
    def specificity_map(self) -> Path:
        return self.path / "specificity_map.parquet"

    @property
    def findings(self) -> Path:
        return self.path / "findings.parquet"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    def coords_part(self, cell: str) -> Path:
        return self.parts / "umap_coords" / f"{cell}.parquet"

    def coords_parts(self) -> list[Path]:
        return sorted((self.parts / "umap_coords").glob("*.parquet"))

    def items_part(self, technique: str, cell: str) -> Path:
        return self.parts / "items" / technique / f"{cell}.parquet"

    def knows_part(self, cell: str) -> Path:
        """Per-target forced choice of one set (written by the knows stage, read by the
        known-only causal stages)."""
        return self.parts / "knows_items" / f"{cell}.parquet"

    def knows_parts(self) -> list[Path]:
        return sorted((self.parts / "knows_items").glob("*.parquet"))

    def cells_dir(self, technique: str, cell: str) -> Path:
        """Directory of a technique's content-keyed sub-cells for one concept set."""
        return self.path / "cells" / technique / cell

    def activations(self, set_name: str) -> Path:
        return self.path / "activations" / set_name

    def store(self, stage: str) -> CellStore:
        """The store of a technique's (technique, set) cells."""
        return CellStore(self.parts / stage)

    def lock(self) -> RunLock:
        return RunLock(self.path)

    # -- metadata ----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """The manifest of a finished run ({} before the run finished)."""
        mf = self.manifest_path
        return json.loads(mf.read_text()) if mf.exists() else {}

    def model_info(self) -> dict[str, Any]:
        """What the cells recorded of the model (name, n_layers, d_model, weights); {} if none."""
        p = self.model_info_path
        return json.loads(p.read_text()) if p.exists() else {}

    def prepare(self, config: dict[str, Any]) -> None:
        """Create the directory, or check that an existing run used the same config."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise MedmapError(
                f"output directory {self.path} is not writable ({e.strerror})",
                hint="choose a directory you can write to with --out",
            ) from None
        cfg_path = self.config_path
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            if old != json.loads(json.dumps(config, default=str)):
                changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise MedmapError(
                    f"{self.path} holds a run with a different config (differs in {', '.join(changed)})",
                    hint="use another --out directory to start a new run, or the same settings to resume",
                )
        else:
            write_json_atomic(cfg_path, config)

    def remove_orphans(self) -> int:
        """Delete temporary files left by a killed run (call only while holding the lock)."""
        import shutil

        n = 0
        for p in sorted(self.path.rglob("*.tmp"), key=lambda p: -len(p.parts)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
        return n

    def cell_path(self, stage: str, cell: str) -> Path:
        return self.store(stage).path(cell)

    def done(self, stage: str, cell: str) -> bool:
        return self.store(stage).has(cell)

    def write_cell(self, stage: str, cell: str, df: pd.DataFrame, seconds: float) -> None:
        self.store(stage).put(cell, df, meta={"seconds": seconds})

    def read_cell(self, stage: str, cell: str) -> pd.DataFrame:
        df = self.store(stage).get(cell)
        if df is None:
            raise MedmapError(f"cell {stage}/{cell} of {self.path} is not finished")
        return df

    def stage_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for meta in sorted(self.parts.glob("*/*.json")):
            stage = meta.parent.name
            out[stage] = out.get(stage, 0.0) + json.loads(meta.read_text())["seconds"]
        return out


RunDir = Run  # the earlier name
