"""How a checkpoint's files reach the disk: DeepSpeed's checkpoint engine, replaced.

DeepSpeed's ``save_checkpoint`` hands every file it writes (rank 0's model states, every rank's ZeRO-2
optimizer partition) to ``engine.checkpoint_engine.save(state, path)``; ``CheckpointWriter`` takes
that role (``install_writer``). The files are what DeepSpeed's own engine writes (``torch.save`` of the
same objects, with its serialization setting), read by ``load_checkpoint``, ``zero_to_fp32`` and
``ds_to_universal`` alike; an asynchronous save writes host copies of the tensors, so a tensor that was
a view into a larger flat buffer is stored compact, which every reader handles the same way.

* Each rank checksums (CRC-32) the files it writes *as it writes them*, and fsyncs them: no rank reads
  a file back, and rank 0 never reads the other ranks' files. ``records`` are what the completeness
  marker lists.
* With ``async_save`` the state is copied to host memory (pinned on CUDA, the copies enqueued on the
  current stream, so the next step's kernels run after them without any wait on the host) and a
  background thread writes it while training goes on. DeepSpeed returns from ``save_checkpoint`` at
  once; nothing waits for the writer at the next optimizer step. When the files of a tag are durable,
  the writer records them in ``<tag>/.files-rank<R>.json``; rank 0's ``on_complete`` (the marker,
  ``latest``, retention) runs only once every rank's record is there, so a rank killed in the middle of
  a write leaves no marker and the previous checkpoint stays the resume point.

The host copies are reused from one save to the next (same shapes), so a save waits for the previous
one's write only when saves come faster than the disk takes them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

RECORD = ".files-rank{rank}.json"  # a rank's written files, in the tag folder, once they are durable


class _HashingFile:
    """A file opened for writing whose bytes are CRC-32'd as they pass (``torch.save`` only writes)."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.crc = 0
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.crc = zlib.crc32(view, self.crc)  # releases the GIL: training goes on meanwhile
        self.size += view.nbytes
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())  # durable before any marker names it
        self.f.close()


def write_file(state: Any, path: Path, zipped: bool = True) -> dict:
    """``torch.save`` into ``path``, checksummed on the way and fsynced; returns {size, crc32}."""
    out = _HashingFile(path)
    try:
        torch.save(state, out, _use_new_zipfile_serialization=zipped)
    finally:
        out.close()
    return {"size": out.size, "crc32": f"{out.crc:08x}"}


class HostCopies:
    """Host buffers for a state's tensors, kept from one save to the next."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.buffers: list[torch.Tensor] = []
        self._next = 0
        self._seen: dict[tuple, torch.Tensor] = {}  # one copy of a tensor a state holds twice

    def start(self) -> None:
        self._next = 0
        self._seen = {}

    def take(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in self._seen:
            return self._seen[key]
        i = self._next
        self._next += 1
        if i < len(self.buffers) and self.buffers[i].shape == t.shape and self.buffers[i].dtype == t.dtype:
            buf = self.buffers[i]
        else:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pinned)
            if i < len(self.buffers):
                self.buffers[i] = buf
            else:
                self.buffers.append(buf)
        buf.copy_(t.detach(), non_blocking=self.pinned)
        self._seen[key] = buf
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


def _copy(obj: Any, copies: HostCopies) -> Any:
    """The state with every tensor copied to the host; containers copied, other values kept (DeepSpeed's
    metadata: shapes, names, enums, numbers)."""
    if isinstance(obj, torch.Tensor):
        return copies.take(obj)
    if isinstance(obj, dict):
        out = obj.__class__() if obj.__class__ is not dict else {}
        for k, v in obj.items():
            out[k] = _copy(v, copies)
        return out
    if isinstance(obj, list):
        return [_copy(v, copies) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        items = [_copy(v, copies) for v in obj]
        return obj.__class__(*items) if hasattr(obj, "_fields") else obj.__class__(items)
    return obj


class CheckpointWriter:
    """DeepSpeed's ``CheckpointEngine`` interface (create, save, load, commit, makedirs), written to
    disk with checksums while writing, synchronously or in the background (see the module's docstring)."""

    def __init__(self, rank: int, world_size: int, async_save: bool, device: torch.device, zipped: bool = True):
        self.name = "deepmim-writer"
        self.rank, self.world_size = rank, world_size
        self.async_save = async_save
        self.zipped = zipped
        self.copies = HostCopies(pinned=device.type == "cuda")
        self.records: dict[str, dict] = {}  # files written for the tag being saved: name -> {size, crc32}
        self.tag_dir: Path | None = None
        self.on_complete: Callable[[Path, dict], None] | None = None  # rank 0: marker, latest, retention
        self.error: BaseException | None = None  # a background write that failed (raised by the trainer)
        self.blocked_s = 0.0  # how long the last save waited for the previous one
        self.write_s = 0.0  # how long the last background write took (files, record, rank 0's marker)
        self._pending: list[tuple[Path, Any]] = []
        self._jobs: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- DeepSpeed's interface
    def create(self, info) -> None:
        self.wait()  # the host copies and the previous tag's write are reused / must be done
        self._abort.clear()
        self.tag_dir = Path(info.save_dir) / info.tag
        self.records = {}
        self._pending = []
        self.copies.start()

    def makedirs(self, path, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        path = Path(path)
        if self.async_save:
            self._pending.append((path, _copy(state_dict, self.copies)))
        else:
            self.records[path.name] = write_file(state_dict, path, self.zipped)

    def load(self, path: str, map_location=None) -> Any:
        from engine.weights.safe_load import safe_load  # DeepSpeed's classes only: no code runs while reading

        return safe_load(path, map_location=map_location)

    def commit(self, info) -> bool:
        if self.async_save:
            event = None
            if self.copies.pinned:  # the copies were enqueued on this stream: the writer waits for them
                event = torch.cuda.Event()
                event.record()
            self._start()
            self._idle.clear()
            self._jobs.put((self.tag_dir, list(self._pending), event, self.on_complete))
            self._pending = []
        return True

    def is_decoupled(self) -> bool:
        return False

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0

    def preserves_storage_sharing(self) -> bool:
        return True

    def cleanup(self) -> None:
        self.wait()

    # ---------------------------------------------------------------- ours
    def wait(self) -> float:
        """Wait for the write in flight (and, on rank 0, its marker); returns the seconds waited."""
        t0 = time.perf_counter()
        self._idle.wait()
        self.blocked_s = time.perf_counter() - t0
        return self.blocked_s

    def abort(self) -> None:
        """Stop waiting for other ranks' records (one of them failed); the tag gets no marker."""
        self._abort.set()

    @property
    def writing(self) -> bool:
        return not self._idle.is_set()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            tag_dir, files, event, on_complete = self._jobs.get()
            t0 = time.perf_counter()
            try:
                if event is not None:
                    event.synchronize()  # the host copies have landed
                records = {path.name: write_file(state, path, self.zipped) for path, state in files}
                record = tag_dir / RECORD.format(rank=self.rank)
                write_record(record, records)
                if on_complete is not None:
                    on_complete(tag_dir, gather_records(tag_dir, self.world_size, self._abort))
            except BaseException as err:  # a full disk, a rank that never finished: the tag gets no marker
                self.error = err
                with contextlib.suppress(OSError):
                    (tag_dir / f".failed-rank{self.rank}").write_text(f"{type(err).__name__}: {err}\n")
                log.warning("rank %d: writing checkpoint %s failed: %s", self.rank, tag_dir.name, err)
            finally:
                self.write_s = time.perf_counter() - t0
                self._idle.set()


def write_record(path: Path, records: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(records, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def gather_records(
    tag_dir: Path, world_size: int, abort: threading.Event | None = None, timeout_s: float = 3600.0
) -> dict:
    """Rank 0, in the background: every rank's records of ``tag_dir`` once all are there (the ranks
    write theirs when their files are durable); raises when a rank failed, when ``abort`` is set, or
    when a rank never finishes."""
    deadline = time.monotonic() + timeout_s
    files: dict[str, dict] = {}
    for rank in range(world_size):
        path = tag_dir / RECORD.format(rank=rank)
        while not path.is_file():
            failed = next(tag_dir.glob(".failed-rank*"), None)
            if failed is not None:
                raise OSError(f"{failed.name.removeprefix('.failed-')}: {failed.read_text().strip()}")
            if abort is not None and abort.is_set():
                raise OSError(f"stopped waiting for rank {rank}'s files: the save failed on some rank")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank} did not finish writing {tag_dir.name}")
            time.sleep(0.05)
        files.update(json.loads(path.read_text()))
    return files


def install_writer(engine: Any, rank: int, world_size: int, device: torch.device, async_save: bool) -> CheckpointWriter:
    """Replace ``engine``'s checkpoint engine with a ``CheckpointWriter`` (same serialization setting)."""
    current = getattr(engine, "checkpoint_engine", None)
    zipped = bool(getattr(current, "zipfile_serialization", True))
    writer = CheckpointWriter(rank, world_size, async_save, device, zipped=zipped)
    engine.checkpoint_engine = writer
    return writer
