"""Output paths: check them before any work, and turn failed writes into one-line errors.

:func:`check_out_dir` runs before a command loads a model, so an unusable ``--out`` costs nothing
and creates nothing. :func:`write_error` maps the ``OSError`` of a failed write (disk full,
permission denied, read-only file system, a file where a directory should be) to a
:class:`~medmap.errors.MedmapError`; writers remove their temporary file first, so a failed write
leaves no partial file behind.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

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
