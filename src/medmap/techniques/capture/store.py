"""On-disk activation store: a float32 ``.npy`` memmap plus a small JSON manifest.

Layout of a store directory::

    activations.npy     float32, shape (n_prompts, n_layers_kept, d_model)
    prompts.json        the prompts (and spans) in row order
    manifest.json       model, layers kept, position, shape, complete flag

The directory is built under a temporary name and renamed when complete, so a crash never
leaves a half-written store behind under the final name.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medmap.errors import MedmapError
from medmap.run.outputs import write_error


class ActivationStore:
    """Write activations batch by batch to a memory-mapped array; finalise atomically.

    Use as a context manager; on an exception the temporary directory is removed.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        shape: tuple[int, int, int],
        meta: dict[str, Any],
        *,
        prompts: list[str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and any(self.out_dir.iterdir()):
            if (self.out_dir / "manifest.json").exists():
                raise MedmapError(
                    f"{self.out_dir} already holds an activation store",
                    hint="choose another --out directory or delete it",
                )
            raise MedmapError(
                f"{self.out_dir} exists and is not empty", hint="choose an empty --out directory"
            )
        parent = self.out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(
                tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".tmp", dir=parent)
            )
        except OSError as e:
            raise write_error(e, self.out_dir) from None
        self.shape = shape
        self.meta = dict(meta)
        self.prompts = prompts
        npy = self._tmp / "activations.npy"
        try:
            self.array = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=shape)
            _reserve(npy)
        except OSError as e:
            self.array = None
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise write_error(e, self.out_dir / npy.name) from None

    def write(self, start: int, values: np.ndarray) -> None:
        """Store rows ``start : start + len(values)``."""
        self.array[start : start + len(values)] = values

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.array = None
            shutil.rmtree(self._tmp, ignore_errors=True)
            return False
        if self.array is None:  # already finalised or discarded
            return False
        try:
            self.array.flush()
            self.array = None
            manifest = {
                **self.meta,
                "shape": list(self.shape),
                "dtype": "float32",
                "complete": True,
            }
            if self.prompts is not None:
                (self._tmp / "prompts.json").write_text(json.dumps(self.prompts, indent=1))
            (self._tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            if self.out_dir.exists():
                self.out_dir.rmdir()  # empty (checked in __init__)
            os.replace(self._tmp, self.out_dir)
        except OSError as e:
            self.array = None
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise write_error(e, self.out_dir) from None
        return False


def _reserve(path: Path) -> None:
    """Allocate the file's blocks now, so a full disk is an error here, not a crash later.

    Writing into a sparse memory map on a full disk kills the process with SIGBUS; reserving the
    space up front turns that into an ``OSError(ENOSPC)``. File systems without ``fallocate``
    support are skipped.
    """
    if not hasattr(os, "posix_fallocate"):
        return
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def open_store(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Open a finished store read-only: ``(memmap array, manifest dict)``."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.exists():
        raise MedmapError(f"{path} is not a complete activation store (no manifest.json)")
    manifest = json.loads(mf.read_text())
    return np.load(path / "activations.npy", mmap_mode="r"), manifest
