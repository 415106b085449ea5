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
import subprocess
import sys
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


def apply_retention(root: str | Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (never those whose marker says
    ``keep``: the every-N-epochs ones) and partial ones older than the newest complete checkpoint."""
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
        if p in keep or (not partial and read_marker(p).get("keep", False)):
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


def to_universal(tag_dir: Path, out_root: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (per-parameter fp32 weights and
    Adam moments), which loads on any number of ranks. Idempotent; the result carries the
    original's completeness marker."""
    target = out_root / tag_dir.name
    if (target / MARKER).is_file():
        return target
    tmp = out_root / (tag_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    out_root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "2",
           "--num_merge_workers", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"converting {tag_dir} to a universal checkpoint failed:\n{proc.stderr[-2000:]}")
    shutil.copy2(tag_dir / MARKER, tmp / MARKER)
    os.replace(tmp, target)
    return target
