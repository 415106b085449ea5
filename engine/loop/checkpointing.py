"""Saving a run: the engine's files, then the completeness marker, ``latest`` and retention.

``Checkpointer.save`` is called on every rank at a step boundary. The engine writes its files through
``CheckpointWriter`` (each rank checksums what it writes while writing it, and fsyncs it); then rank 0
writes ``complete.json`` listing every rank's files with the sizes and CRC-32s the ranks recorded (no
file is read back), renames ``latest``, and deletes checkpoints beyond ``checkpoint.keep_last`` in a
thread of its own, off the training thread.

With ``checkpoint.async_save`` (the default) the save returns once the state is copied to host
memory; the files, the marker, ``latest`` and retention follow in the writer's thread while training
goes on. The marker is written only after every rank has recorded its files as durable, so a process
killed during the write leaves the previous checkpoint as the resume point. A failed background write
(a full disk) is reported by every rank at the next save or at the end of the run, the way a failed
synchronous save is; ``finish`` waits for the write in flight (a preemption, the end of the run, a
rollback, a transient stop).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from data_pipeline.dataset.hashing import crc32_file
from engine.config import Config, RunPlan, fingerprint, to_dict
from engine.config.schema import CheckpointConfig
from engine.disk import as_disk_error, free_space
from engine.errors import CheckpointError, StackError
from engine.loop.checkpoint_writer import RECORD, CheckpointWriter, install_writer
from engine.loop.dist import DistInfo, all_gather_objects, any_rank, barrier
from engine.loop.faults import NoFaults
from engine.loop.rng import rng_state
from engine.run_folder import checkpoints as ckpt

log = logging.getLogger(__name__)


class Checkpointer:
    """The saves of one run (see the module's docstring). ``blocked_s`` adds up how long saves held the
    training thread (the goodput account's checkpoint time)."""

    def __init__(self, engine: Any, dist: DistInfo, root: Path, cfg: CheckpointConfig, faults: NoFaults):
        self.engine, self.dist, self.root, self.cfg, self.faults = engine, dist, root, cfg, faults
        self.async_save = cfg.async_save
        self.writer: CheckpointWriter = install_writer(engine, dist.rank, dist.world_size, dist.device, cfg.async_save)
        self.blocked_s = 0.0
        self.saves = 0
        self._tag_in_flight: str | None = None
        self._info: dict = {}  # the marker's contents for the save under way
        self._cleaner: threading.Thread | None = None

    # ------------------------------------------------------------------ saving
    def save(self, step: int, client_state: dict, info: dict) -> Path:
        """Save the state of ``step`` (every rank calls this); returns the checkpoint folder."""
        t0 = time.perf_counter()
        self.raise_failed()  # the previous background write, on any rank
        tag = ckpt.tag_for(step)
        path = self.root / tag
        self._info = info
        if self.dist.is_main and self.async_save:
            self.writer.on_complete = functools.partial(self._complete, info=info)
        error = None
        try:
            self.engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        except Exception as err:  # disk full, permissions, a file in the way: never half-succeed
            error = err
        if any_rank(error is not None, self.dist.device):
            self._discard(path)
            raise self._failure(tag, error) from error
        if self.async_save:
            self._tag_in_flight = tag
        else:
            self._finish_sync(path)
        blocked = time.perf_counter() - t0
        self.blocked_s += blocked
        self.saves += 1
        how = "state copied for the background writer" if self.async_save else "saved"
        log.info("checkpoint %s: %s in %.2fs", path, how, blocked)
        return path

    def _finish_sync(self, path: Path) -> None:
        """The synchronous save's marker: every rank's records gathered to rank 0, which writes it."""
        parts = all_gather_objects(self.writer.records, self.dist.world_size)
        failed = None
        if self.dist.is_main:
            records = {name: rec for part in parts for name, rec in part.items()}
            try:
                self._complete(path, records, info=self._info, prune_later=True)
            except StackError as err:
                failed = err
        if any_rank(failed is not None, self.dist.device):  # every rank stops alike
            self._discard(path)
            raise failed or CheckpointError(f"writing the marker of {path} failed on rank 0")
        barrier()

    def _complete(self, path: Path, records: dict, info: dict, prune_later: bool = False) -> None:
        """Rank 0, once every rank's files are durable: the marker, ``latest``, then retention (in the
        writer's thread for an asynchronous save, in a thread of its own for a synchronous one)."""
        self.faults.before_marker()
        files = dict(records)
        for extra in sorted(p for p in path.iterdir() if p.is_file()):  # DeepSpeed's copied recovery scripts
            if extra.name not in files and not extra.name.startswith((ckpt.MARKER, ".files-rank", ".failed-rank")):
                _fsync_file(extra)
                files[extra.name] = {"size": extra.stat().st_size, "crc32": crc32_file(extra)}
        try:
            ckpt.mark_complete(path, info, files)
            ckpt.write_latest(self.root, path.name)
        except OSError as err:
            raise as_disk_error(err, path / ckpt.MARKER) or CheckpointError(f"{path}: {err}") from None
        for rank in range(self.dist.world_size):
            (path / RECORD.format(rank=rank)).unlink(missing_ok=True)
        if prune_later:
            self._join_cleaner()
            self._cleaner = threading.Thread(target=self._prune, name="checkpoint-retention", daemon=True)
            self._cleaner.start()
        else:
            self._prune()

    def _prune(self) -> None:
        try:
            for removed in ckpt.apply_retention(self.root, self.cfg.keep_last):
                log.debug("deleted old checkpoint %s", removed)
        except OSError as err:  # an old checkpoint left in place is not worth stopping a run for
            log.warning("could not delete old checkpoints in %s: %s", self.root, err)

    def _join_cleaner(self) -> None:
        if self._cleaner is not None:
            self._cleaner.join()
            self._cleaner = None

    # ------------------------------------------------------------------ waiting and failures
    def wait(self) -> None:
        """Every rank: the write in flight is durable and (rank 0) marked complete; raises on every rank
        when it failed on any. Called before a preemption exit, at the end, before a rollback."""
        waited = self.writer.wait()
        self.blocked_s += waited
        self._join_cleaner()
        self.raise_failed()
        if self._tag_in_flight is not None:
            barrier()  # rank 0's marker is written before any rank goes on
            self._tag_in_flight = None

    def raise_failed(self) -> None:
        """A background write that failed on any rank stops every rank (collective)."""
        if not self.async_save:
            return
        failed = self.writer.error
        if any_rank(failed is not None, self.dist.device):
            self.writer.abort()  # rank 0 stops waiting for the records of a rank that failed
            self.writer.wait()
            tag = self._tag_in_flight or "?"
            self._tag_in_flight = None
            self._discard(self.root / tag)
            if isinstance(failed, StackError):  # the marker could not be written: its own one line
                raise failed
            raise self._failure(tag, failed) from failed

    def _failure(self, tag: str, error: BaseException | None) -> CheckpointError:
        why = (str(error).strip().splitlines() or [type(error).__name__])[0][:300] if error else "on another rank"
        return CheckpointError(
            f"saving checkpoint {tag} failed ({why}; {free_space(self.root)}); the earlier checkpoints in "
            f"{self.root} are untouched and the newest complete one is used on resume"
        )

    def _discard(self, path: Path) -> None:
        """A checkpoint whose save failed is removed (rank 0): no partial files stay behind, and the
        earlier checkpoints are untouched."""
        if self.dist.is_main and path.name.startswith("step_"):
            shutil.rmtree(path, ignore_errors=True)
        barrier()

    def close(self) -> None:
        """Leave nothing running (a process that exits without ``wait`` keeps the previous checkpoint)."""
        self._join_cleaner()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_state(
    cfg: Config, dist: DistInfo, plan: RunPlan, loader: Any, task: Any, precision: str, progress: dict, keep: bool
) -> tuple[dict, dict]:
    """What a save records besides weights and optimizer state (every rank calls this: the per-rank
    parts, loader position, RNG and task state, are gathered to all): the client state DeepSpeed stores
    in the model-states file, and the marker's contents (``progress``: step, skipped updates, rollbacks)."""
    mine = {"loader": loader.state_dict(), "rng": rng_state(), "task": task.state_dict()}
    ranks = all_gather_objects(mine, dist.world_size)
    config = {"config": to_dict(cfg), "config_fingerprint": fingerprint(cfg), **task.reference()}
    client = {
        "format_version": ckpt.FORMAT_VERSION,
        "train": {
            **progress,
            "epoch": loader.epoch,
            "samples_into_epoch": loader.samples_consumed(),
            "steps_per_epoch": plan.steps_per_epoch,
            "grad_accum": plan.grad_accum,
        },
        **config,
        "world_size": dist.world_size,
        "precision": precision,
        "ranks": ranks,
    }
    info = {
        "step": progress["step"],
        "epoch": loader.epoch,
        "world_size": dist.world_size,
        "keep": keep,
        "precision": precision,  # what engine.precision=auto resolved to: a resume keeps it
        "data": loader.data_state(),
        **config,  # the config travels in the marker too, so a resume can refuse it before loading anything
    }
    return client, info
