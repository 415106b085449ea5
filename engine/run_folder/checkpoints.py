"""Checkpoints: DeepSpeed's sharded save plus our completeness marker and retention.

Layout: ``RUN_DIR/checkpoints/step_00001000/`` holds what ``engine.save_checkpoint`` writes
(model states with our ``client_state``, one optimizer shard per rank). A checkpoint counts only
once rank 0 has written ``complete.json`` into it, after every rank finished writing; the marker
is written to a temporary name and renamed, so a crash at any moment leaves either a complete
checkpoint or an ignorable partial one. Resume takes the newest complete checkpoint and never
guesses.

The marker also records the size and CRC-32 of every file of the checkpoint. Before a resume the
files are verified against it (the ranks split the work); a checkpoint that fails (a file missing,
truncated or changed after it was written) is renamed ``broken-step_*`` and the newest one that
verifies is used instead, with a warning naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_pipeline.dataset.hashing import crc32_file
from engine.errors import CheckpointError

log = logging.getLogger(__name__)

MARKER = "complete.json"
BROKEN_NOTE = "BROKEN.txt"  # in a checkpoint set aside as broken-step_*: what was wrong with it
MODEL_STATES = ("mp_rank_00_model_states.pt", "local_states.pt")  # DeepSpeed's, the local engine's
FORMAT_VERSION = 2  # 2: the marker lists the files with sizes and CRC-32
_TAG = re.compile(r"^step_(\d{8,})$")


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


def describe_files(path: Path) -> dict[str, dict]:
    """{relative name: {size, crc32}} of every file in a checkpoint folder but the marker."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((MARKER, ".files-rank")))
    with ThreadPoolExecutor(max_workers=min(8, len(files) or 1)) as pool:
        crcs = list(pool.map(crc32_file, files))
    return {str(p.relative_to(path)): {"size": p.stat().st_size, "crc32": c} for p, c in zip(files, crcs)}


def file_problems(path: Path, names: list[str], recorded: dict[str, dict]) -> list[str]:
    """What is wrong with these files of a checkpoint, compared with its marker."""
    problems = []
    for name in names:
        f, want = path / name, recorded[name]
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != want["size"]:
            problems.append(f"{name} is {f.stat().st_size} bytes, {want['size']} when written")
        elif crc32_file(f) != want["crc32"]:
            problems.append(f"{name} changed since it was written (CRC-32 differs)")
    return problems


def verify(path: Path, rank: int = 0, world_size: int = 1, gather: Callable[[object], list] | None = None) -> list[str]:
    """Problems of a complete checkpoint's files (empty: it verifies). Ranks split the files."""
    try:
        recorded = read_marker(path).get("files")
    except CheckpointError as err:  # the marker itself is damaged: nothing vouches for the files
        return [str(err).removeprefix(f"{path}: ")]
    if recorded is None:
        return []  # written before markers listed files: nothing to compare with
    names = sorted(recorded)
    mine = file_problems(path, names[rank::world_size], recorded)
    parts = gather(mine) if gather is not None else [mine]
    return [p for part in parts for p in part]


def newest_verified(
    root: Path,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[object], list] | None = None,
    barrier: Callable[[], None] | None = None,
) -> Path | None:
    """The newest complete checkpoint whose files verify; broken ones are renamed out of the way."""
    candidates = list(reversed(list_checkpoints(root)))
    if barrier is not None:
        # Every rank lists before rank 0 renames anything: a rank listing after a rename would see no
        # candidate, skip the barriers below and leave rank 0 waiting in one.
        barrier()
    for path in candidates:
        problems = verify(path, rank, world_size, gather)
        if not problems:
            if rank == 0 and (root / "latest").is_file() and (root / "latest").read_text().strip() != path.name:
                write_latest(root, path.name)  # it named a checkpoint that was just set aside
            return path
        if rank == 0:
            set_aside(path, problems)
        if barrier is not None:
            barrier()
    return None


def set_aside(path: Path, problems: list[str]) -> Path:
    """Rename a damaged checkpoint ``broken-step_*`` with a note of what is wrong (rank 0)."""
    log.warning(
        "checkpoint %s is damaged (%s); it is renamed broken-%s and the next older one is tried",
        path,
        "; ".join(problems[:3]),
        path.name,
    )
    (path / BROKEN_NOTE).write_text("\n".join(problems) + "\n")  # why, for every later start to say
    aside = path.with_name(f"broken-{path.name}")
    os.replace(path, aside)
    return aside


class Verification:
    """This rank's share of a checkpoint's files checked against its marker in a background thread,
    while the run builds its data, model and engine (which the check does not touch); it also brings
    the files into the page cache the engine's load then reads from."""

    def __init__(self, path: Path, rank: int, world_size: int):
        self.path = path
        self._mine: list[str] = []
        self.seconds = 0.0
        recorded = read_marker(path).get("files") or {}
        names = sorted(recorded)[rank::world_size]
        self._thread = threading.Thread(target=self._run, args=(names, recorded), name="checkpoint-verify", daemon=True)
        self._thread.start()

    def _run(self, names: list[str], recorded: dict) -> None:
        t0 = time.perf_counter()
        try:
            self._mine = file_problems(self.path, names, recorded)
        except OSError as err:
            self._mine = [f"unreadable ({err})"]
        self.seconds = time.perf_counter() - t0

    def problems(self, gather: Callable[[object], list] | None = None) -> list[str]:
        """Every rank's problems (collective when ``gather`` is given); waits for this rank's share."""
        self._thread.join()
        parts = gather(self._mine) if gather is not None else [self._mine]
        return [p for part in parts for p in part]


def mark_complete(path: Path, info: dict, files: dict[str, dict] | None = None) -> None:
    """Write ``complete.json``: ``info`` and ``files`` ({name: {size, crc32}}, as the ranks recorded
    them while writing; read back from disk when not given)."""
    files = describe_files(path) if files is None else files
    tmp = path / (MARKER + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump({"format_version": FORMAT_VERSION, "time": time.time(), **info, "files": files}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / MARKER)
    except OSError:
        tmp.unlink(missing_ok=True)  # never a temporary file left behind
        raise
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


def holds_run(run_dir: str | Path) -> str:
    """What of a run a folder holds ('' for nothing): checkpoints, metrics."""
    run_dir = Path(run_dir)
    found = []
    ckpts = (
        [p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir()]
        if (run_dir / "checkpoints").is_dir()
        else []
    )
    if ckpts:
        newest = max((step_of(p.name) or 0) for p in ckpts)
        found.append(f"{len(ckpts)} checkpoint(s), the newest at step {newest}")
    if (run_dir / "metrics.jsonl").is_file():
        found.append("metrics.jsonl")
    return " and ".join(found)


def move_run_aside(run_dir: Path) -> Path:
    """Move everything of the run in ``run_dir`` (but the held lock) into a sibling folder
    ``<name>.previous-<time>``; returns it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir.with_name(f"{run_dir.name}.previous-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir.with_name(f"{run_dir.name}.previous-{stamp}-{n}")
    dest.mkdir(parents=True)
    for entry in run_dir.iterdir():
        if entry.name != "run.lock":
            os.replace(entry, dest / entry.name)
    return dest


def write_latest(root: Path, tag: str) -> None:
    """``root/latest`` names ``tag``, the way DeepSpeed's own tools find a checkpoint
    (``zero_to_fp32.py``, ``ds_to_universal``, ``engine.load_checkpoint`` without a tag). Written only
    after the checkpoint's marker, and to a verified checkpoint after a fallback, so it never names
    a partial one; our resume still decides by markers alone."""
    tmp = root / "latest.tmp"
    tmp.write_text(tag)
    os.replace(tmp, root / "latest")


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
        if not partial:  # the marker first: a deletion cut short leaves a partial folder, never a complete one
            (p / MARKER).unlink(missing_ok=True)
            _fsync_dir(p)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def broken_checkpoints(root: str | Path) -> list[tuple[Path, str]]:
    """Checkpoints set aside as damaged (``broken-step_*``), oldest first, with what was wrong."""
    root = Path(root)
    found = []
    for p in sorted(root.glob("broken-step_*")) if root.is_dir() else []:
        note = p / BROKEN_NOTE
        why = note.read_text().strip().splitlines()[0] if note.is_file() and note.read_text().strip() else "damaged"
        found.append((p, why))
    return found


def no_checkpoint_verifies(root: Path, broken: list[tuple[Path, str]]) -> CheckpointError:
    """The refusal every start gives a run folder whose checkpoints all failed their checks."""
    listed = "; ".join(f"{p.name} ({why})" for p, why in broken[-3:])
    more = f" and {len(broken) - 3} older" if len(broken) > 3 else ""
    newest = broken[-1][0] if broken else root
    return CheckpointError(
        f"no checkpoint in {root.resolve()} verifies: {listed}{more}. Not starting from step 0 in a folder that "
        f"held a run. To go on: --resume {newest.resolve()} forces that checkpoint (its files are loaded as they "
        "are: check them first), or --resume fresh moves the run aside and starts over, or choose another --run-dir"
    )


def states_file(path: Path) -> Path | None:
    return next((path / n for n in MODEL_STATES if (path / n).is_file()), None)


def read_marker(path: Path) -> dict:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable {MARKER} ({err})") from None
