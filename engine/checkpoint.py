"""Checkpoints: DeepSpeed's sharded save plus our completeness marker and retention.

Layout: ``RUN_DIR/checkpoints/step_00001000/`` holds what ``engine.save_checkpoint`` writes
(model states with our ``client_state``, one optimizer shard per rank). A checkpoint counts only
once rank 0 has written ``complete.json`` into it, after every rank finished writing; the marker
is written to a temporary name and renamed, so a crash at any moment leaves either a complete
checkpoint or an ignorable partial one. Resume takes the newest complete checkpoint and never
guesses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "complete.json"
FORMAT_VERSION = 1
_TAG = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def list_checkpoints(root: str | Path, complete_only: bool = True) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = step_of(p.name)
        if step is None or not p.is_dir():
            continue
        if complete_only and not (p / MARKER).is_file():
            continue
        found.append((step, p))
    return [p for _, p in sorted(found)]


def newest_complete(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def mark_complete(path: Path, info: dict) -> None:
    tmp = path / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "time": time.time(), **info}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MARKER)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def apply_retention(root: str | Path, keep_last: int, keep_every_steps: int = 0) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (keeping multiples of
    ``keep_every_steps``) and partial ones older than the newest complete checkpoint."""
    root = Path(root)
    complete = list_checkpoints(root)
    if not complete:
        return []
    newest_step = step_of(complete[-1].name)
    keep = set(complete[-keep_last:])
    removed = []
    for p in list_checkpoints(root, complete_only=False):
        step = step_of(p.name)
        partial = not (p / MARKER).is_file()
        if p in keep or (keep_every_steps and step % keep_every_steps == 0 and not partial):
            continue
        if partial and step >= newest_step:
            continue  # could be a save in flight by another process; never touch
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def read_marker(path: Path) -> dict:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable {MARKER} ({err})") from None
