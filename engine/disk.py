"""File-system faults as one line: a full disk, a read-only or unwritable run folder.

Everything a run writes besides the checkpoint (metrics, evaluations, TensorBoard, figures, sample
keys, config.json, PREEMPTED) goes through ``writing(path)``: an ``OSError`` that says the disk is
full, or that the folder cannot be written, becomes ``DiskError`` (exit code 2) naming the path and
the space left on its file system, instead of a traceback on every rank. Checkpoints handle their
own failures (engine.loop.trainer, engine.run_folder.checkpoints) and use ``free_space`` in their message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from engine.errors import UserError

FULL = {errno.ENOSPC, errno.EDQUOT}
DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}


class DiskError(UserError):
    """The run folder's file system is full, read-only or not writable."""


def _existing(path: Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_space(path: str | Path) -> str:
    """'123 MB free on that file system' for the file system holding ``path``."""
    try:
        free = shutil.disk_usage(_existing(Path(path))).free
    except OSError:
        return "free space unknown"
    return f"{free / 1e6:.1f} MB free on that file system"


def as_disk_error(err: BaseException, path: str | Path) -> DiskError | None:
    """The one-line error for a file-system fault writing ``path``, or None for other errors."""
    code = getattr(err, "errno", None)
    if code in FULL:
        return DiskError(f"no space left writing {path} ({free_space(path)}); free some space and resume")
    if code in DENIED:
        return DiskError(f"cannot write {path}: {os.strerror(code)}; the run folder must be writable")
    return None


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a full or unwritable file system while writing ``path`` into ``DiskError``."""
    try:
        yield
    except OSError as err:
        mapped = as_disk_error(err, path)
        if mapped is None:
            raise
        raise mapped from None


def check_writable(folder: str | Path, what: str = "run folder", fix: str = "choose a writable --run-dir") -> None:
    """Before launch: the folder (or the nearest folder that exists above it) can be written.
    ``os.access`` answers for read-only file systems even for root."""
    target = _existing(Path(folder))
    if not target.is_dir():
        raise DiskError(f"{what} {folder}: {target} exists and is not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        why = "on a read-only file system" if _read_only(target) else "not writable by this user"
        raise DiskError(f"{what} {Path(folder).absolute()}: {target} is {why}; {fix}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
