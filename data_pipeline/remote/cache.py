"""The node-local shard cache: whole tars, shared by the ranks of a node, within a byte budget.

A file lock per shard makes one process fetch it while the others wait; a node-wide lock
serializes the budget: before a fetch, the least recently used shards are removed until the new
one fits.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from engine.errors import DataError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock shared by every process of the node (released when the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardCache:
    """Whole tars in ``root/<namespace>/``, at most ``budget`` bytes over all namespaces."""

    def __init__(self, root: Path, namespace: str, budget: int):
        self.root, self.dir, self.budget = root, root / namespace, int(budget)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.tar"

    def usage(self) -> int:
        """Bytes held: cached tars plus the reservations of fetches in progress (stale ones dropped)."""
        used = 0
        for ns in self.root.iterdir():
            if not ns.is_dir():
                continue
            for f in ns.iterdir():
                if f.suffix == ".tar":
                    with contextlib.suppress(FileNotFoundError):
                        used += f.stat().st_size
                elif f.suffix == ".reserve":
                    try:
                        nbytes, pid = (int(x) for x in f.read_text().split())
                    except (OSError, ValueError):
                        continue
                    if _alive(pid):
                        used += nbytes
                    else:  # a fetch killed mid-way: its reservation and partial file go
                        f.unlink(missing_ok=True)
                        for tmp in ns.glob(f"{f.stem}.tar.{pid}.tmp*"):
                            tmp.unlink(missing_ok=True)
        return used

    def _reserve(self, name: str, nbytes: int, timeout_s: float) -> Path:
        if nbytes > self.budget:
            raise DataError(
                f"shard {name} is {nbytes / 2**30:.2f} GB, more than the whole shard cache "
                f"(data.cache_gb={self.budget / 2**30:.2f}); raise data.cache_gb"
            )
        deadline = time.monotonic() + timeout_s
        while True:
            with file_lock(self.root / ".budget.lock"):
                used = self.usage()
                if used + nbytes > self.budget:
                    used -= self._evict(used + nbytes - self.budget)
                if used + nbytes <= self.budget:
                    marker = self.dir / f"{name}.reserve"
                    marker.write_text(f"{nbytes} {os.getpid()}")
                    return marker
            if time.monotonic() > deadline:  # the rest is reserved by fetches in progress
                raise DataError(
                    f"the shard cache {self.root} (data.cache_gb={self.budget / 2**30:.2f}) stays full of shards "
                    "being fetched by this node's ranks; raise data.cache_gb"
                )
            time.sleep(0.2)

    def _evict(self, need: int) -> int:
        """Remove least recently used tars (any namespace) until ``need`` bytes are free; returns bytes freed."""
        tars = []
        for ns in self.root.iterdir():
            if ns.is_dir():
                for f in ns.glob("*.tar"):
                    with contextlib.suppress(FileNotFoundError):
                        st = f.stat()
                        tars.append((st.st_mtime, st.st_size, f))
        freed = 0
        for _, size, f in sorted(tars):
            if freed >= need:
                break
            f.unlink(missing_ok=True)
            freed += size
            log.debug("shard cache: evicted %s", f)
        return freed

    def ensure(self, name: str, nbytes: int, fetch: Callable[[Path], None], timeout_s: float) -> Path:
        """The cached tar, fetched by ``fetch(tmp_path)`` (one process per node) when absent."""
        path = self.path(name)
        if path.exists():
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)  # recently used: evicted last
                return path
        with file_lock(self.dir / f"{name}.lock"):
            if path.exists():
                os.utime(path)
                return path
            marker = self._reserve(name, nbytes, timeout_s)
            tmp = self.dir / f"{name}.tar.{os.getpid()}.tmp"
            try:
                fetch(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
                marker.unlink(missing_ok=True)
        return path
