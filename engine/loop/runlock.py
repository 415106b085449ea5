"""One job per run folder.

Two jobs writing the same run folder would both write ``step_N`` checkpoints and double every
metrics and sample-key line. Rank 0 takes an exclusive ``flock`` on ``RUN_DIR/run.lock`` before
anything is written and holds it until the process exits; the kernel releases it when the holder
dies, however it dies, so a lock left by a killed job is never in the way (the file's contents,
who held it, are only shown in the message). A second job is refused at start-up on every rank.

flock works across nodes on NFSv4 and Lustre with the ``flock`` mount option; on file systems
without it the lock only guards against jobs on the same node.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from engine.errors import RunFolderBusy

__all__ = ["RunFolderBusy", "RunLock", "lock_run_folder"]

log = logging.getLogger(__name__)


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "run.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderBusy(
                f"{self.path.parent.resolve()} is in use by another job ({holder}); wait for it to finish, stop it, "
                "or use another --run-dir"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"


def lock_run_folder(lock: RunLock, run_dir: Path, dist, resume: str) -> None:
    """Rank 0 takes the run folder's lock and every rank agrees on the outcome; with ``--resume fresh``
    a run already in the folder is moved aside, under the lock (no other job is using what moves)."""
    from engine.loop.dist import any_rank, barrier
    from engine.run_folder import checkpoints as ckpt

    error = None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()
        except RunFolderBusy as err:
            error = err
    if any_rank(error is not None, dist.device):
        raise RunFolderBusy(str(error or f"{run_dir.resolve()} is in use by another job"))
    if resume == "fresh":
        if dist.is_main and ckpt.holds_run(run_dir):
            moved = ckpt.move_run_aside(run_dir)
            log.warning("--resume fresh: the run that was in %s is now in %s", run_dir, moved)
        barrier()
