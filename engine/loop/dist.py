"""Distributed set-up, in one place.

This is the only module that reads the launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE);
everything else receives a frozen ``DistInfo``. The ``deepspeed`` launcher sets those variables
for every process, also across nodes and under SLURM.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1  # ranks on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(timeout_minutes: int = 30) -> DistInfo:
    """Initialize torch.distributed through DeepSpeed (NCCL on GPU, gloo on CPU)."""
    import deepspeed
    import torch

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if "MASTER_ADDR" not in os.environ:  # a plain `python -m engine.pretrain`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    import contextlib
    import io

    printed = io.StringIO()  # DeepSpeed prints "... shm_comm_op built successfully" on every rank
    with contextlib.redirect_stdout(printed):
        deepspeed.init_distributed(
            dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), verbose=False
        )
    if printed.getvalue().strip():
        log.debug("deepspeed: %s", printed.getvalue().strip())
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, local_world_size=local_world)


def env_rank() -> int:
    """This process's rank as the launcher announced it (0 outside a launcher), before any set-up."""
    return int(os.environ.get("RANK", "0"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """A TCP port that is free on this machine now (for a world of one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFilter(logging.Filter):
    """Lets through records from rank 0, and warnings and errors from every rank."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def quiet_known_noise() -> None:
    """Silence messages that every rank prints and that say nothing about the run: deprecation and
    future warnings from the libraries, DeepSpeed's per-rank info lines (its warnings stay)."""
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*CUDA_HOME.*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # torch's "No CUDA runtime is found, using CUDA_HOME" (CPU machines) and "triton not found"
    for name in ("torch.utils.cpp_extension", "torch.utils.flop_counter"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # DALI turns the warning filters back to "default" around its own warnings, so those two are
    # dropped after the fact, as log records: its RandAugment still calls the deprecated
    # fn.experimental names, and its checkpoints do not cover an external_source, which is by
    # design here (the sample plan's position is ours, saved with the loader state).
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addFilter(_not_dali_noise)


DALI_NOISE = ("is now a regular DALI operator", "Checkpointing enabled in a pipeline with external source")


def _not_dali_noise(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(text in message for text in DALI_NOISE)


def setup_logging(rank: int, level: str = "INFO", log_file: str | None = None) -> None:
    fmt = logging.Formatter("%(asctime)s [rank%(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "with_rank", False):

        def with_rank(*args, **kwargs) -> logging.LogRecord:
            record = factory(*args, **kwargs)
            record.rank = rank
            return record

        with_rank.with_rank = True
        logging.setLogRecordFactory(with_rank)
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler()
    handler.addFilter(RankFilter(rank))
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.addFilter(RankFilter(rank))
        fh.setFormatter(fmt)
        root.addHandler(fh)


# ---------------------------------------------------------------------- collectives used by the trainer


def all_gather_objects(obj, world_size: int) -> list:
    """Every rank's ``obj`` (small Python objects: loader states, preflight findings)."""
    import torch

    if world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    out = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (a rare, deliberate sync)."""
    import torch

    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor(1.0 if flag else 0.0, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


SHM_PATTERN = "/dev/shm/deepspeed_allreduce_buffer_*"


def reclaim_stale_shared_memory(min_age_s: float = 60.0, only: set[str] | None = None) -> list[str]:
    """Remove DeepSpeed CPU all-reduce buffers that no live process holds (left by killed runs: a
    SIGKILL skips ``release_shared_memory``). A buffer is in use while any process has it mapped or
    open; younger ones are left alone (a job starting beside this one may be about to map its own).
    ``only``: consider these paths alone."""
    import glob
    import time

    files = set(glob.glob(SHM_PATTERN)) if only is None else set(only)
    if not files:
        return []
    in_use: set[str] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        with contextlib.suppress(OSError), open(maps) as f:
            in_use.update(line.split(None, 5)[-1].strip() for line in f if "deepspeed_allreduce_buffer_" in line)
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if "deepspeed_allreduce_buffer_" in target:
                in_use.add(target)
    removed = []
    now = time.time()
    for path in sorted(files - in_use):
        with contextlib.suppress(OSError):
            if now - os.stat(path).st_mtime >= min_age_s:
                os.unlink(path)
                removed.append(path)
    return removed


def release_shared_memory() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer (``/dev/shm/deepspeed_allreduce_buffer_*``).

    DeepSpeed's shared-memory all-reduce on CPU creates one ~70 MB buffer per rank and master port
    and never unlinks it, so every finished CPU run leaves RAM-backed files behind. Peers mapped the
    buffer at start-up, so removing its name at exit is safe. Only a buffer this process has mapped
    is removed: a name alone could be a later job's that was given the same (freed) port.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return
    suffixes = {os.environ.get("RANK", "0"), os.environ.get("LOCAL_RANK", "0")}
    mine = {f"{SHM_PATTERN[:-1]}{os.getuid()}_{addr}_{port}_{s}" for s in suffixes}
    try:
        with open("/proc/self/maps") as f:
            mapped = {line.split(None, 5)[-1].strip() for line in f if "deepspeed_allreduce_buffer_" in line}
    except OSError:
        return
    for path in sorted(mine & mapped):
        with contextlib.suppress(OSError):
            os.unlink(path)
