"""Start-up checks of a shard folder, shared by all ranks, that turn data faults into counted skips.

Run once at start-up (and on every resume), before any loader is built. Per shard:

* a missing or unreadable tar: all of its samples are skipped;
* the counts of the manifest, the index file and the tar (its headers walked) are compared and a
  disagreement is reported with the shard's name; the loaders read the manifest, so a manifest row
  whose bytes are not where it says in the tar (phantom rows, a truncated tar) is skipped, and tar
  members the manifest does not list are ignored;
* ``checks=markers`` (default): every image must have its format's start and end markers (JPEG SOI
  and EOI, PNG signature and IEND, WebP's RIFF header and size), and the
  label stored in the tar must equal the manifest's; ``checks=decode`` also decodes each image
  (slow; for suspect data); ``checks=index`` only compares manifest offsets with the tar size;
* samples that failed to decode during an earlier run of this run folder (recorded by the loaders
  in ``RUN_DIR/data_view/runtime_bad_rank*.json``) are skipped without any decode pass.

Ranks split the shards between them, exchange their findings, and all train on the same list of
excluded rows, so the step counts stay equal. ``bad_samples.json`` lists every skipped sample with
its reason; above ``max_bad_share`` of the samples, start-up stops with a message naming that file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipeline.dataset.members import MARKER_CHECKS, decode_error, scan_tar_index
from data_pipeline.dataset.table import SampleTable, ShortTar
from data_pipeline.dataset.wds_index import Component, IndexError_, read_index
from data_pipeline.loaders.source import DatasetView
from engine.errors import DataError, TransientError

log = logging.getLogger(__name__)

CHECKS = ("index", "markers", "decode")


@dataclass(frozen=True)
class BadSample:
    shard: str
    key: str  # "*" for a whole shard
    reason: str
    rank: int = 0  # the rank that found it
    count: int = 1  # samples lost (a whole unreadable shard counts all of its samples)
    rows: tuple[int, ...] = ()  # manifest rows


def check_shard(table: SampleTable, name: str, checks: str, rank: int = 0) -> list[BadSample]:
    """The bad samples of one shard (manifest rows), and warnings for count disagreements."""
    rows = table.rows_of(name)
    if table.remote:
        return _check_remote_rows(table, name, rows, rank)
    tar = table.tar(name)
    try:
        size = tar.stat().st_size
        fd = os.open(tar, os.O_RDONLY)
    except OSError as err:
        return [
            BadSample(
                name, "*", f"tar unreadable ({err.strerror or err})", rank, len(rows), tuple(int(r) for r in rows)
            )
        ]
    try:
        return _check_rows(table, name, rows, checks, rank, size, fd)
    finally:
        os.close(fd)


def _check_remote_rows(table: SampleTable, name: str, rows: np.ndarray, rank: int) -> list[BadSample]:
    """Shards in object storage are not read at start-up: the manifest's byte ranges are compared with
    the tar size dataset.json records; images are checked as they are fetched and decoded."""
    size = table.source.tar_bytes.get(name)
    if size is None or getattr(table.source, "rows", None) is not None:
        return []  # (rows read by shard are checked against the tar's size when they are fetched)
    end = np.asarray(table.offset[rows]) + np.asarray(table.size[rows])
    why = "past the end of the tar (by its recorded size)"
    return [BadSample(name, table.keys[int(r)].as_py(), why, rank, 1, (int(r),)) for r in rows[end > size]]


def _check_rows(table, name, rows, checks, rank, size, fd) -> list[BadSample]:
    walked = {s.key: s for s in scan_tar_index(table.tar(name))} if checks != "index" else None
    try:
        n_index = len(read_index(table.idx(name)))
    except IndexError_ as err:
        n_index = None
        log.warning("rank %d: %s (the loaders read the manifest; index files are for other tools)", rank, err)
    counts = {"manifest": len(rows), "index": n_index, "tar": len(walked) if walked is not None else None}
    known = [v for v in counts.values() if v is not None]
    if len(set(known)) > 1:
        log.warning(
            "rank %d: shard %s: the manifest lists %d samples, the index %s, the tar %s; samples the "
            "manifest lists but the tar does not hold are skipped, tar members the manifest does not list "
            "are ignored",
            rank,
            name,
            counts["manifest"],
            counts["index"],
            counts["tar"],
        )
    bad = []
    for r in rows:
        key, off, n = table.keys[int(r)].as_py(), int(table.offset[r]), int(table.size[r])
        reason = _row_problem(table, r, key, off, n, size, fd, walked, checks)
        if reason:
            bad.append(BadSample(name, key, reason, rank, 1, (int(r),)))
    return bad


def _row_problem(table, r, key, off, n, size, fd, walked, checks) -> str | None:
    """Why manifest row ``r`` cannot be trained on, or None."""
    if off + n > size:
        return "truncated tar (sample extends past the end of the file)"
    comps: dict[str, Component] = {}
    if walked is not None:
        s = walked.get(key)
        comps = {c.ext.lower(): c for c in s.components} if s is not None else {}
        if not comps:
            return "in the manifest but not in the tar"
        if not any((c.offset, c.size) == (off, n) for c in comps.values()):
            return f"the manifest's byte range {off}+{n} is not one of the sample's tar members"
        label = table.label_source
        if label == "cls" and "cls" not in comps:
            return "sample lacks its .cls file"
        if label.startswith("json:") and "json" not in comps:
            return "sample lacks its .json file (its label)"
    if checks in ("markers", "decode"):
        reason = MARKER_CHECKS[table.format(r)](fd, off, n)
        if reason is not None:
            return reason
        cls = comps.get("cls") if table.label_source == "cls" else None
        stored = os.pread(fd, cls.size, cls.offset).decode(errors="replace").strip() if cls is not None else None
        if stored is not None and stored != str(int(table.label[r])):
            return f"label in the tar differs from the manifest's ({int(table.label[r])})"
    if checks == "decode":
        return decode_error(os.pread(fd, n, off))
    return None


# ------------------------------------------------------------------------------ run-time faults


def find_undecodable(table: SampleTable, rows: np.ndarray) -> list[tuple[int, str]]:
    """(row, reason) of the samples among ``rows`` that do not decode (or cannot be read). A shard that
    changed in object storage, or a condition of the moment, is raised: never a property of a sample."""
    from data_pipeline.remote.retry import ChangedObject

    found: dict[int, str] = {}
    for i in np.unique(np.asarray(rows, dtype=np.int64)):
        if int(i) in found:
            continue
        try:
            reason = decode_error(table.read(int(i)))
        except (ChangedObject, TransientError):
            raise
        except ShortTar as err:  # the tar ends early: this sample and every later one of the shard
            rows_of = table.rows_of(err.shard)
            for r in rows_of[table.offset[rows_of] + table.size[rows_of] > err.tar_bytes]:
                found[int(r)] = f"past the end of its tar ({err.tar_bytes} bytes)"
            continue
        except (OSError, DataError) as err:
            reason = f"cannot be read ({err})"
        if reason:
            found[int(i)] = reason
    return sorted(found.items())


def record_runtime_bad(view_dir: str | Path, rank: int, table: SampleTable, found: list[tuple[int, str]]) -> Path:
    """Append samples that failed during training to this rank's record in the run's data_view."""
    folder = Path(view_dir) if view_dir else table.root
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"runtime_bad_rank{rank}.json"
    old = json.loads(path.read_text()) if path.is_file() else []
    old += [{"row": i, "key": table.key(i), "reason": why} for i, why in found]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(old, indent=1))
    os.replace(tmp, path)
    return path


def _runtime_bad(out_dir: Path, table: SampleTable) -> list[BadSample]:
    found = []
    for path in sorted(out_dir.glob("runtime_bad_rank*.json")):
        for item in json.loads(path.read_text()):
            row = int(item["row"])
            if row < len(table) and table.key(row) == item["key"]:  # the same data as when it was recorded
                shard, _, key = item["key"].partition("/")
                found.append(BadSample(shard, key, "failed at run time: " + item["reason"], -1, 1, (row,)))
    return found


# ------------------------------------------------------------------------------ all ranks


def run(
    info: DatasetView,
    checks: str,
    out_dir: Path,
    rank: int,
    world_size: int,
    gather: Callable[[object], list],
    barrier: Callable[[], None],
) -> DatasetView:
    """Check this rank's share of the shards, agree with the other ranks, and return the view
    every rank trains on. ``gather(obj)`` returns the list of every rank's ``obj``."""
    if checks not in CHECKS:
        raise DataError(f"fault.data_checks={checks!r}: allowed values are {list(CHECKS)}")
    table = info.table
    if table.remote and rank == 0:
        log.info(
            "data: shards in %s are checked against their recorded sizes now, and as they are fetched "
            "(size and checksum) and decoded; fault.data_checks=%s applies to local shards",
            table.source.url,
            checks,
        )
    mine = [b for name in table.shards[rank::world_size] for b in check_shard(table, name, checks, rank)]
    for b in mine[:20]:
        log.warning("rank %d: skipping %s/%s: %s", rank, b.shard, b.key, b.reason)
    bad = [b for part in gather(mine) for b in part] + _runtime_bad(out_dir, table)
    excluded = tuple(sorted({r for b in bad for r in b.rows}))
    if rank == 0:
        _write_view(info, out_dir, excluded, bad)
    barrier()
    return DatasetView(table, excluded)


def _write_view(info: DatasetView, out_dir: Path, excluded: tuple[int, ...], bad: list[BadSample]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    listing = [{k: v for k, v in asdict(b).items() if k != "rows"} for b in bad]
    (out_dir / "bad_samples.json").write_text(json.dumps(listing, indent=1))
    view = {
        "shards": list(info.shards),
        "num_samples": info.total_samples - len(excluded),
        "total_samples": info.total_samples,
        "bad_samples": len(excluded),
        "bad_by_rank": _by_rank(bad),
        "excluded": list(excluded),
    }
    tmp = out_dir / "view.json.tmp"
    tmp.write_text(json.dumps(view, indent=1))
    os.replace(tmp, out_dir / "view.json")


def _by_rank(bad: list[BadSample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in bad:
        out[str(b.rank)] = out.get(str(b.rank), 0) + b.count
    return out


def check_threshold(view: DatasetView, max_share: float, where: Path) -> None:
    bad = view.total_samples - view.num_samples
    if view.total_samples and bad / view.total_samples > max_share:
        raise DataError(
            f"{bad} of {view.total_samples} samples ({bad / view.total_samples:.3%}) are unreadable, above "
            f"fault.max_bad_sample_share={max_share:.3%}; they are listed in {where / 'bad_samples.json'}. "
            "Fix or re-shard the data (python -m data_pipeline.verify), or raise the threshold knowingly."
        )
