"""The node-local shard cache: whole tars, shared by the ranks of a node, within a byte budget.

Layout under the cache root: ``<namespace>/<shard>.tar`` (one namespace per dataset version),
``<namespace>/<shard>.lock`` (held by the process fetching that shard), ``<namespace>/<shard>.reserve``
(the bytes a fetch in progress will take, and the name of its partial file) and ``.budget.lock``
(held while the budget is counted and a reservation made). Before a fetch, the least recently used
tars are removed until the new one fits in the budget.

Whether a fetch is alive is decided by a lock, never by a process id: the fetcher holds an ``flock``
on its reservation file from the moment it is created until the fetch ends, and the kernel drops
the lock when the process dies, however it dies. A reservation that nobody holds is a fetch that
was killed: its bytes and its partial file are reclaimed, whatever pid it names and whichever PID
namespace (container) wrote it; a live fetch in another container sharing the host folder holds its
lock and is left alone. (Reservations written by earlier versions, ``<bytes> <pid>``, hold no lock and
are reclaimed the same way.)

Waiting is bounded: a shard lock held by another process, or a budget taken by fetches in progress,
is waited for until the caller's deadline, then ``TransientFetchError`` (a condition of the moment,
never a record against the data).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from data_pipeline.remote.retry import TransientFetchError
from engine.errors import DataError

log = logging.getLogger(__name__)


def _lock_fd(fd: int, deadline: float | None, what: str) -> None:
    """flock(LOCK_EX) on ``fd``: blocking, or polled until ``deadline`` (then TransientFetchError)."""
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    start, wait = time.monotonic(), 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                waited = time.monotonic() - start
                raise TransientFetchError(
                    f"{what}: waited {waited:.0f} s for another process of this node that holds it (fetching it)"
                ) from None
            time.sleep(random.uniform(0.5, 1.5) * wait)
            wait = min(0.5, 2 * wait)


@contextlib.contextmanager
def file_lock(path: Path, deadline: float | None = None, what: str = "") -> Iterator[None]:
    """An exclusive lock shared by every process of the node (released when the holder dies);
    with ``deadline`` (``time.monotonic()``), waited for until then only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock_fd(fd, deadline, what or f"the lock {path}")
        yield
    finally:
        os.close(fd)


class Reservation:
    """Bytes set aside in the budget for one fetch, and the partial file it writes; the lock on the
    reservation file is held until ``release`` (or the process's death)."""

    def __init__(self, marker: Path, fd: int, tmp: Path):
        self.marker, self.fd, self.tmp = marker, fd, tmp

    def release(self) -> None:
        self.tmp.unlink(missing_ok=True)
        self.marker.unlink(missing_ok=True)  # before the lock goes: no one reclaims a live one
        os.close(self.fd)


class ShardCache:
    """Whole tars in ``root/<namespace>/``, at most ``budget`` bytes over all namespaces."""

    def __init__(self, root: Path, namespace: str, budget: int):
        self.root, self.dir, self.budget = root, root / namespace, int(budget)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.tar"

    # ------------------------------------------------------------------ accounting
    def usage(self) -> int:
        """Bytes held: cached tars plus live reservations (stale ones are reclaimed). Call it under the
        budget lock: reservations are only made under it, so none appears half-made."""
        used = 0
        for ns in self.root.iterdir():
            if not ns.is_dir():
                continue
            for f in ns.iterdir():
                if f.suffix == ".tar":
                    with contextlib.suppress(FileNotFoundError):
                        used += f.stat().st_size
                elif f.suffix == ".reserve":
                    used += self._live_bytes(f)
        return used

    def _live_bytes(self, marker: Path) -> int:
        """The bytes of a reservation whose fetch is alive (its lock is held); 0 after reclaiming a dead one."""
        try:
            fd = os.open(marker, os.O_RDONLY)
        except FileNotFoundError:
            return 0  # its fetch just ended
        try:
            nbytes, partial = _parse_reservation(marker, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return nbytes  # held: a fetch in progress, in this process or any other
            for tmp in partial:  # nobody holds it: its fetch was killed
                tmp.unlink(missing_ok=True)
            marker.unlink(missing_ok=True)
            log.info("shard cache: reclaimed %s and its partial file (a fetch that was killed)", marker.name)
            return 0
        finally:
            os.close(fd)

    def _reserve(self, name: str, nbytes: int, deadline: float) -> Reservation:
        if nbytes > self.budget:
            raise DataError(
                f"shard {name} is {nbytes / 2**30:.2f} GB, more than the whole shard cache "
                f"(data.cache_gb={self.budget / 2**30:.2f}); raise data.cache_gb"
            )
        while True:
            with file_lock(self.root / ".budget.lock"):
                used = self.usage()
                if used + nbytes > self.budget:
                    used -= self._evict(used + nbytes - self.budget)
                if used + nbytes <= self.budget:
                    marker = self.dir / f"{name}.reserve"
                    tmp = self.dir / f"{name}.tar.{uuid.uuid4().hex[:12]}.tmp"
                    fd = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                    fcntl.flock(fd, fcntl.LOCK_EX)  # free: reservations are made under the budget lock only
                    os.write(fd, f"{nbytes} {tmp.name}\n".encode())
                    return Reservation(marker, fd, tmp)
            if time.monotonic() > deadline:  # the rest is reserved by fetches in progress
                raise TransientFetchError(
                    f"the shard cache {self.root} (data.cache_gb={self.budget / 2**30:.2f}) stayed full of shards "
                    "being fetched by this node's ranks; raise data.cache_gb if this repeats",
                    name,
                )
            time.sleep(random.uniform(0.1, 0.3))

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

    def make_room(self, nbytes: int) -> int:
        """After a full disk: evict least recently used tars worth ``nbytes`` (readers that hold one
        open keep reading it; the space comes back when they close it)."""
        with file_lock(self.root / ".budget.lock"):
            return self._evict(nbytes)

    # ------------------------------------------------------------------ fetching
    def _hit(self, path: Path, nbytes: int) -> bool:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if size != nbytes:  # damaged on the cache disk after it was checked: fetched again
            log.warning("shard cache: %s is %d bytes, not %d; fetching it again", path, size, nbytes)
            path.unlink(missing_ok=True)
            return False
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # recently used: evicted last
        return True

    def ensure(self, name: str, nbytes: int, fetch: Callable[[Path], None], deadline: float) -> Path:
        """The cached tar, fetched by ``fetch(partial_path)`` (one process per node) when absent;
        waits for another process's fetch of it until ``deadline`` (``time.monotonic()``)."""
        path = self.path(name)
        if self._hit(path, nbytes):
            return path
        with file_lock(self.dir / f"{name}.lock", deadline, f"the fetch of shard {name}"):
            if self._hit(path, nbytes):
                return path
            res = self._reserve(name, nbytes, deadline)
            try:
                fetch(res.tmp)
                os.replace(res.tmp, path)
            finally:
                res.release()
        return path


def _parse_reservation(marker: Path, fd: int) -> tuple[int, list[Path]]:
    """(bytes, partial files) of a reservation: ``<bytes> <partial file>``, or ``<bytes> <pid>`` as
    earlier versions wrote it (their partial files were ``<shard>.tar.<pid>.tmp*``)."""
    try:
        fields = os.pread(fd, 512, 0).decode(errors="replace").split()
        nbytes = int(fields[0])
    except (OSError, ValueError, IndexError):
        return 0, []
    other = fields[1] if len(fields) > 1 else ""
    if other.endswith(".tmp") and "/" not in other:
        return nbytes, [marker.parent / other]
    return nbytes, list(marker.parent.glob(f"{marker.stem}.tar.{other}.tmp*")) if other.isdigit() else []
