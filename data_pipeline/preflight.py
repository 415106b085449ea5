"""Start-up checks of a shard folder, shared by all ranks, that turn data faults into counted skips.

Run once at start-up (and on every resume), before any loader is built:

* a missing or unreadable tar: all of its samples are skipped;
* a missing or malformed index file: rebuilt from the tar when the tar is readable;
* a truncated tar: samples whose bytes lie past the end of the file are skipped;
* ``checks=markers`` (default): every JPEG must start with SOI and have EOI near its end, and
  every label must parse; ``checks=decode`` also decodes each image (slow; for suspect data);
  ``checks=index`` only reads the index files and compares them with the tar sizes.

Ranks split the shards between them, exchange their findings, and all build the same filtered
view: the same sample list on every rank, so the step counts stay equal. The view (filtered
index files for the shards that needed it, plus ``view.json`` and ``bad_samples.json``) is
written under the run folder and read by both loaders. Above ``max_bad_share`` of the samples,
start-up stops with a message that names the file listing them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline.loader import DataError, DatasetInfo, read_dataset
from data_pipeline.wds_index import Component, IndexedSample, IndexError_, read_index, write_index

log = logging.getLogger(__name__)

CHECKS = ("index", "markers", "decode")


@dataclass(frozen=True)
class BadSample:
    shard: str
    key: str  # "*" for a whole shard
    reason: str
    rank: int = 0  # the rank that found it
    count: int = 1  # samples lost (a whole unreadable shard counts all of its samples)


@dataclass
class ShardResult:
    shard: str
    good: list[IndexedSample]
    bad: list[BadSample]
    rebuilt: bool  # the index had to be rebuilt or filtered: a new index file is needed


def scan_tar_index(tar_path: Path) -> list[IndexedSample]:
    """Rebuild DALI index entries by walking the tar (stops quietly at a truncated end)."""
    samples: list[IndexedSample] = []
    current: list[Component] = []
    last_key = None
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                ext = m.name.rpartition("/")[2].partition(".")[2]
                key = m.name[: len(m.name) - len(ext) - 1] if ext else m.name
                if key != last_key and current:
                    samples.append(IndexedSample(last_key, tuple(current)))
                    current = []
                last_key = key
                current.append(Component(ext, m.offset_data, m.size, m.name))
    except (tarfile.ReadError, EOFError, OSError):
        pass  # truncated: keep what was readable; sizes are checked against the file below
    if current:
        samples.append(IndexedSample(last_key, tuple(current)))
    return samples


def _jpeg_ok(f, comp: Component) -> str | None:
    if comp.size < 4:
        return "JPEG too small"
    f.seek(comp.offset)
    head = f.read(2)
    if head != b"\xff\xd8":
        return "corrupt JPEG (no SOI marker)"
    tail_len = min(comp.size, 1024)
    f.seek(comp.offset + comp.size - tail_len)
    if b"\xff\xd9" not in f.read(tail_len):
        return "corrupt or truncated JPEG (no EOI marker)"
    return None


def _decode_ok(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
    except Exception as err:
        return f"JPEG does not decode ({type(err).__name__})"
    return None


def check_shard(info: DatasetInfo, name: str, checks: str, rank: int = 0) -> ShardResult:
    tar, idx = info.tar(name), info.idx(name)
    try:
        size = tar.stat().st_size
        with open(tar, "rb") as f:
            f.read(1)
    except OSError as err:
        lost = info.shard_sizes.get(name, 0)
        return ShardResult(
            name, [], [BadSample(name, "*", f"tar unreadable ({err.strerror or err})", rank, lost)], True
        )
    rebuilt = False
    try:
        entries = read_index(idx)
    except IndexError_ as err:
        log.warning("rank %d: %s; rebuilding it from %s", rank, err, tar.name)
        entries, rebuilt = scan_tar_index(tar), True
    good, bad = [], []
    with open(tar, "rb") as f:
        for s in entries:
            reason = None
            if any(c.offset + c.size > size for c in s.components):
                reason = "truncated tar (sample extends past the end of the file)"
            elif {"jpg", "cls"} - {c.ext for c in s.components}:
                reason = "sample lacks its .jpg or .cls file"
            elif checks in ("markers", "decode"):
                jpg, cls = s.component("jpg"), s.component("cls")
                reason = _jpeg_ok(f, jpg)
                if reason is None:
                    f.seek(cls.offset)
                    try:
                        int(f.read(cls.size).decode())
                    except (UnicodeDecodeError, ValueError):
                        reason = "label is not an integer"
                if reason is None and checks == "decode":
                    f.seek(jpg.offset)
                    reason = _decode_ok(f.read(jpg.size))
            if reason:
                bad.append(BadSample(name, s.key, reason, rank))
            else:
                good.append(s)
    return ShardResult(name, good, bad, rebuilt or bool(bad))


def run(
    info: DatasetInfo,
    checks: str,
    out_dir: Path,
    rank: int,
    world_size: int,
    gather: Callable[[object], list],
    barrier: Callable[[], None],
) -> DatasetInfo:
    """Check this rank's share of the shards, agree with the other ranks, and return the view
    every rank trains on. ``gather(obj)`` returns the list of every rank's ``obj``."""
    if checks not in CHECKS:
        raise DataError(f"fault.data_checks={checks!r}: allowed values are {list(CHECKS)}")
    mine = [check_shard(info, name, checks, rank) for name in info.shards[rank::world_size]]
    for r in mine:
        for b in r.bad[:20]:
            log.warning("rank %d: skipping %s/%s: %s", rank, b.shard, b.key, b.reason)
    # Only shards that need a new index travel; their good entries come along.
    changed = [(r.shard, r.good, r.bad) for r in mine if r.rebuilt]
    everything = [item for part in gather(changed) for item in part]
    bad = [b for _, _, bs in everything for b in bs]
    new_index = {shard: good for shard, good, _ in everything}
    if rank == 0:
        _write_view(info, out_dir, new_index, bad)
    barrier()
    return read_dataset(info.root, view=out_dir)


def _write_view(
    info: DatasetInfo, out_dir: Path, new_index: dict[str, list[IndexedSample]], bad: list[BadSample]
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    index_paths, shards = {}, []
    for name in info.shards:
        if name in new_index:
            if not new_index[name]:
                continue  # nothing usable left in this shard
            path = out_dir / f"{name}.idx"
            write_index(path.with_suffix(".idx.tmp"), new_index[name])
            os.replace(path.with_suffix(".idx.tmp"), path)
            index_paths[name] = str(path)
        shards.append(name)
    total = info.num_samples
    usable = total - sum(b.count for b in bad)
    (out_dir / "bad_samples.json").write_text(json.dumps([asdict(b) for b in bad], indent=1))
    view = {"shards": shards, "index_paths": index_paths, "num_samples": usable, "total_samples": total,
            "bad_samples": total - usable, "bad_by_rank": _by_rank(bad)}  # fmt: skip
    tmp = out_dir / "view.json.tmp"
    tmp.write_text(json.dumps(view, indent=1))
    os.replace(tmp, out_dir / "view.json")


def _by_rank(bad: list[BadSample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in bad:
        out[str(b.rank)] = out.get(str(b.rank), 0) + b.count
    return out


def check_threshold(view: DatasetInfo, max_share: float, where: Path) -> None:
    bad = view.total_samples - view.num_samples
    if view.total_samples and bad / view.total_samples > max_share:
        raise DataError(
            f"{bad} of {view.total_samples} samples ({bad / view.total_samples:.3%}) are unreadable, above "
            f"fault.max_bad_sample_share={max_share:.3%}; they are listed in {where / 'bad_samples.json'}. "
            "Fix or re-shard the data (python -m data_pipeline.verify), or raise the threshold knowingly."
        )
