"""Output paths: check them before any work, write files atomically, and turn failed writes into
one-line errors.

:func:`check_out_dir` runs before a command loads a model, so an unusable ``--out`` costs nothing
and creates nothing. :func:`write_atomic` is the one atomic writer (a temporary file in the same
directory, then a rename); :func:`write_parquet_atomic`, :func:`write_json_atomic` and
:func:`write_text_atomic` are its three uses. :func:`write_error` maps the ``OSError`` of a failed
write (disk full, permission denied, read-only file system, a file where a directory should be) to
a :class:`~medmap.errors.MedmapError`; the temporary file is removed first, so a failed write
leaves no partial file behind.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

from medmap.errors import MedmapError

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
_NOT_DIR = {errno.ENOTDIR, errno.EEXIST}


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


def check_out_dir(out: str | os.PathLike, *, option: str = "--out") -> Path:
    """Raise :class:`MedmapError` unless ``out`` is (or can be created as) a writable directory.

    Creates nothing: the nearest existing ancestor must be a directory we may write into.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MedmapError(
            f"{option} {out} is a file, not a directory", hint=f"give {option} a directory path"
        )
    base = _nearest_existing(out.absolute())
    if not base.is_dir():
        raise MedmapError(
            f"cannot create output directory {out}: {base} is a file, not a directory",
            hint=f"choose {option} under a directory you can write to",
        )
    if not _writable(base):
        raise MedmapError(
            f"output directory {out} is not writable (permission denied on {base})",
            hint=f"choose {option} in a directory you can write to",
        )
    return out


def write_error(exc: OSError, path: str | os.PathLike) -> MedmapError:
    """A one-line :class:`MedmapError` for a write to ``path`` that failed with ``exc``."""
    path = Path(path)
    code = exc.errno
    if code in _FULL:
        return MedmapError(
            f"disk full while writing {path}",
            hint="free space on that disk (or choose an output directory on another disk) "
            "and run the same command again",
        )
    if code in _DENIED:
        why = "read-only file system" if code == errno.EROFS else "permission denied"
        return MedmapError(
            f"cannot write {path}: {why}", hint="choose an output directory you can write to"
        )
    if code in _NOT_DIR:
        base = _nearest_existing(path.absolute())
        if base.exists() and not base.is_dir():
            return MedmapError(
                f"cannot write {path}: {base} is a file, not a directory",
                hint="choose an output directory under a directory",
            )
    return MedmapError(
        f"cannot write {path}: {exc.strerror or exc}",
        hint="check the output directory and free disk space",
    )


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it to ``path``.

    Readers never see a half-written file. A failed write removes the temporary file and raises
    a one-line :class:`MedmapError` (:func:`write_error`) for an ``OSError``; other exceptions
    propagate unchanged (after the clean-up).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(e, path) from e
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(e, path) from e
        raise
    return path


def write_parquet_atomic(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` as Parquet (no index) atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (non-JSON values written with ``str``)."""

    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)

    return write_atomic(path, dump)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
