"""Writing into a folder that other processes may be writing to at the same time (two nodes of one
job running the same ``make_shards`` or ``index_shards`` into one shared folder).

* Every temporary file has a name of its own (process id and a random part): two writers never write
  into the same temporary file, and what one publishes is exactly what it wrote.
* Files are published by ``os.replace`` (atomic): a reader sees the old file or the new one.
* ``claim`` takes one item (a shard) for this process without waiting; ``locked`` waits for a lock
  (the final assembly of a folder, one process at a time). Both are ``flock`` locks: they end with
  the process that holds them, however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_name(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer uses."""
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def remove_stale(folder: Path, name: str) -> None:
    """Temporary files (and folders) of ``name`` left by a writer that was killed. Call it only while
    holding the lock that a live writer of ``name`` would hold."""
    for tmp in folder.glob(f"{name}.*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_bytes(path: Path, data: bytes) -> None:
    tmp = temp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_json(path: Path, obj, indent: int | None = 2) -> None:
    atomic_bytes(path, json.dumps(obj, indent=indent, sort_keys=True).encode())


def replace_folder(tmp: Path, target: Path) -> None:
    """Put the folder ``tmp`` in place of ``target`` (which may exist): the old one is moved aside first,
    since a folder cannot be renamed onto a folder that holds files."""
    old = None
    if target.exists():
        old = temp_name(target)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def claim(path: Path) -> Iterator[bool]:
    """Try to take the lock file ``path`` without waiting: yields True when this process holds it until
    the block ends, False when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Wait for the lock file ``path`` and hold it for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
