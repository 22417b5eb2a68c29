"""A run directory: exclusive lock, finished-cell bookkeeping and atomic writes.

Layout::

    RUN_DIR/.lock                     pid and host of the run writing here
    RUN_DIR/config.json               the validated config of the run (a re-run must match it)
    RUN_DIR/parts/<stage>/<cell>.parquet   one finished cell (tidy rows), written atomically
    RUN_DIR/parts/<stage>/<cell>.json      its metadata (seconds taken)

A cell that exists is finished: a resumed run skips it. Nothing else marks progress.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from medmap.errors import MedmapError
from medmap.results import write_parquet_atomic


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and rename (never a half-written file).

    A failed write raises a one-line :class:`MedmapError` (:func:`medmap.outputs.write_error`).
    """
    from medmap.outputs import write_error

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(e, path) from e
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(e, path) from e
        raise


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


class RunDir:
    """Finished cells of a run, stored as Parquet parts."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

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
        cfg_path = self.path / "config.json"
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
        return self.path / "parts" / stage / f"{cell}.parquet"

    def done(self, stage: str, cell: str) -> bool:
        return self.cell_path(stage, cell).exists()

    def write_cell(self, stage: str, cell: str, df: pd.DataFrame, seconds: float) -> None:
        write_json_atomic(self.cell_path(stage, cell).with_suffix(".json"), {"seconds": seconds})
        write_parquet_atomic(df, self.cell_path(stage, cell))

    def read_cell(self, stage: str, cell: str) -> pd.DataFrame:
        return pd.read_parquet(self.cell_path(stage, cell))

    def stage_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for meta in sorted((self.path / "parts").glob("*/*.json")):
            stage = meta.parent.name
            out[stage] = out.get(stage, 0.0) + json.loads(meta.read_text())["seconds"]
        return out
