"""Shard writer: an image tree -> WebDataset tar shards + DALI index files + a Parquet manifest.

    python -m data_pipeline.make_shards SRC OUT [--shard-size-mb 256] [--seed 0] [--workers 8]
        [--layout classes|val|flat|parquet] [--labels FILE] [--classes classes.json]
        [--quality 95] [--max-short-side 0] [--max-pixels 64000000]

Writes ``OUT/shard-000000.tar`` ... (members ``<key>.jpg`` and ``<key>.cls``), one
``shard-NNNNNN.idx`` per shard, ``classes.json``, ``manifest.parquet``, ``dataset.json`` and
``skipped.json``.

How it stays correct and restartable:
* The plan (which file goes to which shard, in which order) is a pure function of the sorted file
  list, the seed and the shard size; it does not depend on the number of workers. It is saved in
  ``plan.json``; a rerun with different arguments is refused instead of mixing two plans.
* Shards are written by independent worker processes. Each shard is written under temporary
  names and published by renames; its part file ``shard-NNNNNN.part.json`` is renamed last and
  is the proof of completion. A rerun verifies finished shards (size and checksum) and redoes
  the rest, so a killed run resumes into byte-identical output (tar headers carry no timestamps
  or owners).
* A file that is not a readable image is skipped, named in the summary with its reason, and
  never stops the job.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.dataset.columns import write_columns
from data_pipeline.dataset.files import atomic_bytes, atomic_json, claim, locked, remove_stale, temp_name
from data_pipeline.dataset.hashing import HashingWriter, checksum, file_checksum
from data_pipeline.dataset.locations import is_remote
from data_pipeline.dataset.wds_index import Component, IndexedSample, IndexError_, read_index, write_index
from data_pipeline.shards.images import DEFAULT_MAX_PIXELS, BadImage, prepare_image
from data_pipeline.shards.parquet_source import RowReader, scan_parquet
from data_pipeline.shards.report import log_skipped, refuse_empty
from data_pipeline.shards.sources import LAYOUTS, SourceError, SourceItem, sample_key, scan
from engine.errors import DataError, StackError

log = logging.getLogger("make_shards")

PLAN_VERSION = 1
LOCKS = ".locks"  # OUT/.locks/: a claim per shard, and the final assembly's lock
MAX_KEY = 90  # keeps "<key>.jpg" inside a plain ustar header (no long-name extension blocks)


class ShardError(DataError):
    """The output folder cannot be (re)written with these arguments."""


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def plan_shards(items: list[SourceItem], seed: int | None, shard_bytes: int) -> list[list[SourceItem]]:
    """Shuffle deterministically under the seed (None: keep the order), then cut into shards of about
    ``shard_bytes``.

    ``items`` must come sorted (``sources.scan`` sorts), so the plan depends only on the file
    set, the seed and the shard size.
    """
    order = np.arange(len(items)) if seed is None else np.random.default_rng(seed).permutation(len(items))
    shards: list[list[SourceItem]] = [[]]
    size = 0
    for i in order:
        it = items[int(i)]
        if shards[-1] and size + it.size > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.size
    return shards


def unique_keys(items: list[SourceItem]) -> dict[str, str]:
    """rel path -> key; sanitizing may collide or be too long, so such keys get a hash suffix."""
    keys: dict[str, str] = {}
    used: set[str] = set()
    for it in sorted(items, key=lambda x: x.rel):
        key = sample_key(it.rel)
        if len(key) > MAX_KEY or key in used:
            key = f"{key[: MAX_KEY - 17]}_{hashlib.blake2b(it.rel.encode(), digest_size=8).hexdigest()}"
        used.add(key)
        keys[it.rel] = key
    return keys


@dataclass(frozen=True)
class ShardJob:
    index: int
    src: str
    out: str
    items: tuple[tuple[str, int, str], ...]  # (rel, label, key)
    quality: int
    max_short_side: int
    max_pixels: int
    class_names: tuple[str, ...]
    parquet: bool = False  # items are rows of Parquet files (parquet_source), not files


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0  # deterministic bytes: a rerun reproduces the shard exactly
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> Component:
    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    padded = -(-len(data) // 512) * 512
    return Component(name.rsplit(".", 1)[1], tar.offset - padded, len(data), name)


def write_shard(job: ShardJob) -> dict:
    """Write one shard (tar, index, part file) and return its part record; ``{"shard", "busy": True}``
    when another process (a second writer into the same folder) is writing it now."""
    out = Path(job.out)
    name = shard_name(job.index)
    with claim(out / LOCKS / f"{name}.lock") as mine:
        if not mine:
            return {"shard": name, "busy": True}
        done = finished_part(out, job.index)  # the other writer may have finished it meanwhile
        if done is not None:
            return done
        remove_stale(out, name)  # what a killed writer of this shard left
        return _write_shard(job, out, name)


def _write_shard(job: ShardJob, out: Path, name: str) -> dict:
    tar_tmp, idx_tmp = temp_name(out / f"{name}.tar"), temp_name(out / f"{name}.idx")
    rows, skipped, index = [], [], []
    try:
        with open(tar_tmp, "wb") as raw:
            hashed = HashingWriter(raw)  # the checksum of the bytes written here, without reading them back
            with tarfile.open(fileobj=hashed, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                rows_of = RowReader(job.src, [rel for rel, _, _ in job.items]) if job.parquet else None
                for rel, label, key in job.items:
                    try:
                        data = rows_of.read(rel) if rows_of else (Path(job.src) / rel).read_bytes()
                        img = prepare_image(data, job.quality, job.max_short_side, job.max_pixels)
                    except BadImage as err:
                        skipped.append({"source": rel, "reason": str(err)})
                        continue
                    except OSError as err:
                        skipped.append({"source": rel, "reason": f"cannot read ({err.strerror or err})"})
                        continue
                    jpg = _add(tar, f"{key}.jpg", img.data)
                    cls = _add(tar, f"{key}.cls", str(label).encode())
                    index.append(IndexedSample(key, (jpg, cls)))
                    rows.append(
                        {
                            "key": key,
                            "label": label,
                            "class_name": job.class_names[label] if label >= 0 else "",
                            "shard": name,
                            "offset": jpg.offset,
                            "size": jpg.size,
                            "width": img.width,
                            "height": img.height,
                            "source": rel,
                            "checksum": checksum(img.data),
                            "action": img.action,
                        }
                    )
        part = {"shard": name, "num_samples": len(rows), "rows": rows, "skipped": skipped}
        if rows:  # (a shard whose every file was bad publishes no empty tar: DALI rejects those)
            write_index(idx_tmp, index)
            part.update(tar_bytes=hashed.bytes, tar_checksum=hashed.hexdigest(), idx_checksum=file_checksum(idx_tmp))
            os.replace(tar_tmp, out / f"{name}.tar")
            os.replace(idx_tmp, out / f"{name}.idx")
        atomic_bytes(out / f"{name}.part.json", json.dumps(part).encode())  # last: the shard counts as finished
        return part
    finally:
        tar_tmp.unlink(missing_ok=True)
        idx_tmp.unlink(missing_ok=True)


def finished_part(out: Path, index: int) -> dict | None:
    """The part record of a shard that is complete and intact on disk, else None. What is on disk is
    checked, not only the record: the tar's size and checksum, every sample's bytes against the checksum
    taken from the image when it was written, and the index file."""
    name = shard_name(index)
    part_path = out / f"{name}.part.json"
    try:
        part = json.loads(part_path.read_text())
    except (OSError, ValueError):
        return None
    if part["num_samples"] == 0:
        return part
    tar, idx = out / f"{name}.tar", out / f"{name}.idx"
    if not (tar.is_file() and idx.is_file()) or tar.stat().st_size != part["tar_bytes"]:
        return None
    if file_checksum(tar) != part["tar_checksum"]:
        return None
    fd = os.open(tar, os.O_RDONLY)
    try:
        if any(checksum(os.pread(fd, r["size"], r["offset"])) != r["checksum"] for r in part["rows"]):
            return None
    finally:
        os.close(fd)
    if "idx_checksum" in part:
        return part if file_checksum(idx) == part["idx_checksum"] else None
    try:  # a part written before index checksums were recorded
        entries = read_index(idx)
    except IndexError_:
        return None
    same = [(e.key, e.component("jpg").offset) for e in entries] == [(r["key"], r["offset"]) for r in part["rows"]]
    return part if same else None


def _plan_record(args: argparse.Namespace, shards: list[list[SourceItem]]) -> dict:
    digest = hashlib.blake2b(digest_size=16)
    for i, shard in enumerate(shards):
        for it in shard:
            digest.update(f"{i}\t{it.rel}\t{it.label}\t{it.size}\n".encode())
    return {
        "version": PLAN_VERSION,
        "seed": args.seed,
        "shard_size_mb": args.shard_size_mb,
        "layout": args.layout,
        "quality": args.quality,
        "max_short_side": args.max_short_side,
        "max_pixels": args.max_pixels,
        "num_shards": len(shards),
        "fingerprint": digest.hexdigest(),
    }


def write_manifest(out: Path, parts: list[dict]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for p in parts for r in p["rows"]]
    columns = [
        "key",
        "label",
        "class_name",
        "shard",
        "offset",
        "size",
        "width",
        "height",
        "source",
        "checksum",
        "action",
    ]
    table = pa.table({c: [r[c] for r in rows] for c in columns})
    tmp = temp_name(out / "manifest.parquet")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out / "manifest.parquet")
    finally:
        tmp.unlink(missing_ok=True)
    return len(rows)


def run(args: argparse.Namespace) -> dict:
    src, out = Path(args.src), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.layout == "parquet":
        if not src.is_dir():
            raise SourceError(f"source {src} is not a directory")
        items, classes = scan_parquet(src, args.split, args.classes)
    else:
        items, classes = scan(src, args.layout, args.labels, args.classes)
    # Parquet rows stay in file order (a shard then reads one or two files' row groups, not every file)
    shards = plan_shards(items, None if args.layout == "parquet" else args.seed, int(args.shard_size_mb * 2**20))
    plan = _plan_record(args, shards)
    plan_path = out / "plan.json"
    with locked(out / LOCKS / "assemble.lock"):
        if plan_path.is_file():
            old = json.loads(plan_path.read_text())
            if old != plan:
                changed = sorted(k for k in plan if old.get(k) != plan[k])
                raise ShardError(
                    f"{out} holds shards from a different plan (changed: {changed}); "
                    "write to a new folder or delete the old shards"
                )
        else:
            # Shards without a plan (plan.json deleted by hand): their records would pass the checks of
            # finished_part and be kept, mixing another plan's shards into this one.
            orphans = sorted(p.name for p in (*out.glob("shard-*.part.json"), *out.glob("shard-*.tar")))
            if orphans:
                raise ShardError(
                    f"{out} holds {len(orphans)} shard file(s) ({orphans[0]}, ...) but no plan.json "
                    "saying how they were made; write to a new folder or delete the old shards"
                )
            remove_stale(out, "plan.json")
            atomic_json(plan_path, plan)
    keys = unique_keys(items)
    names = tuple(sorted(classes, key=classes.get)) if classes else ()
    parts: dict[int, dict] = {}
    todo = []
    for i, shard in enumerate(shards):
        part = finished_part(out, i)
        if part is not None:
            parts[i] = part
        else:
            job_items = tuple((it.rel, it.label, keys[it.rel]) for it in shard)
            todo.append(
                ShardJob(
                    i,
                    str(src),
                    str(out),
                    job_items,
                    args.quality,
                    args.max_short_side,
                    args.max_pixels,
                    names,
                    args.layout == "parquet",
                )
            )
    if parts:
        log.info("%d of %d shards already finished and verified; writing %d", len(parts), len(shards), len(todo))
    busy = _write_all(todo, args.workers, not args.no_progress)
    for job in busy:  # claimed by another writer into this folder: wait for it, write what it left undone
        with locked(out / LOCKS / f"{shard_name(job.index)}.lock"):
            pass
        part = write_shard(job)
        if part.get("busy"):
            raise ShardError(f"{out}: shard {part['shard']} stays claimed by another writer; run again")
    for job in todo:
        parts[job.index] = json.loads((out / f"{shard_name(job.index)}.part.json").read_text())
    ordered = [parts[i] for i in range(len(shards))]
    with locked(out / LOCKS / "assemble.lock"):  # the folder's own files, one writer at a time
        return _assemble(out, ordered, items, classes, args)


def _assemble(out: Path, ordered: list[dict], items: list, classes: dict, args: argparse.Namespace) -> dict:
    for name in ("manifest.parquet", "columns", "classes.json", "skipped.json", "dataset.json"):
        remove_stale(out, name)  # what a killed writer left (the assembly lock is ours)
    skipped = [s for p in ordered for s in p["skipped"]]
    if not any(p["num_samples"] for p in ordered):
        for p in ordered:  # nothing was made: another layout may be tried in this folder
            (out / f"{p['shard']}.part.json").unlink(missing_ok=True)
        (out / "plan.json").unlink(missing_ok=True)
        refuse_empty(f"{args.src} ({len(items)} files)", skipped, _empty_hint(skipped, args.layout))
    total = write_manifest(out, ordered)
    reencoded = sum(1 for p in ordered for r in p["rows"] if r["action"] != "copied")
    atomic_json(out / "classes.json", classes)
    atomic_json(out / "skipped.json", skipped)
    summary = {
        "num_samples": total,
        "num_files": len(items),
        "num_skipped": len(skipped),
        "num_reencoded": reencoded,
        "num_classes": len(classes),
        "shards": [p["shard"] for p in ordered if p["num_samples"] > 0],
        "seed": args.seed,
        "layout": args.layout,
        "tar_bytes": {p["shard"]: p["tar_bytes"] for p in ordered if p["num_samples"] > 0},
        "tar_checksum": {p["shard"]: p["tar_checksum"] for p in ordered if p["num_samples"] > 0},
        "label_values": sorted({r["label"] for p in ordered for r in p["rows"]}),  # (without reading every row)
    }
    summary["manifest_sha256"] = write_columns(out, summary["shards"])["manifest_sha256"]
    atomic_json(out / "dataset.json", summary)
    _print_summary(summary, skipped)
    return summary


def _write_all(jobs: list[ShardJob], workers: int, progress: bool) -> list[ShardJob]:
    """Write the shards; returns the jobs another writer into the same folder had claimed."""
    if not jobs:
        return []
    total = sum(len(j.items) for j in jobs)
    bar = _progress(total, progress)
    start = time.perf_counter()
    by_name = {shard_name(j.index): j for j in jobs}
    busy = []
    if workers <= 1:
        parts = map(write_shard, jobs)
    else:
        # spawn: workers must not inherit threads (DALI, torch) from a parent that has them
        pool = mp.get_context("spawn").Pool(min(workers, len(jobs)))
        parts = pool.imap_unordered(write_shard, jobs)
    try:
        for part in parts:
            if part.get("busy"):
                busy.append(by_name[part["shard"]])
            else:
                bar.update(part["num_samples"] + len(part["skipped"]))
    finally:
        if workers > 1:
            pool.close()
            pool.join()
    bar.close()
    rate = total / max(time.perf_counter() - start, 1e-9)
    log.info("wrote %d shard(s), %d file(s) at %.0f images/s", len(jobs) - len(busy), total, rate)
    if busy:
        log.info("%d shard(s) are being written by another process; waiting for them", len(busy))
    return busy


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="sharding", disable=not enabled, smoothing=0.1, file=sys.stderr)


def _empty_hint(skipped: list[dict], layout: str) -> str:
    """The likely cause of a source with no image, from the files it holds."""
    exts = {str(s.get("source", "")).rsplit(".", 1)[-1].lower() for s in skipped}
    if "parquet" in exts:
        return "a Hugging Face Parquet dataset: use --layout parquet"
    if "tar" in exts:
        return "WebDataset tars: index them in place with deepmim-index-shards (python -m data_pipeline.index_shards)"
    return f"no image files in this layout (--layout {layout}); see --help for the layouts"


def _print_summary(summary: dict, skipped: list[dict]) -> None:
    log.info(
        "%d samples in %d shards (%d files scanned, %d re-encoded, %d skipped)",
        summary["num_samples"],
        len(summary["shards"]),
        summary["num_files"],
        summary["num_reencoded"],
        summary["num_skipped"],
    )
    log_skipped(log, skipped, "skipped.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.make_shards",
        description="Write an image tree as WebDataset tar shards with DALI index files and a Parquet manifest; "
        "restartable (a rerun keeps finished shards and gives byte-identical output).",
    )
    ap.add_argument("src", help="source image tree (see --layout)")
    ap.add_argument(
        "out", help="output folder for the shards, manifest.parquet, dataset.json, classes.json (or s3://bucket/prefix)"
    )
    ap.add_argument(
        "--shard-size-mb",
        type=float,
        default=256.0,
        help="target shard size in MiB of source bytes (default 256: ~550 shards for ImageNet-1k train)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the cross-shard shuffle (default 0)")
    ap.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="writer processes; the output does not depend on their number (default: min(8, CPUs))",
    )
    ap.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="classes",
        help="classes: SRC/<class>/<file> (ImageNet "
        "train/); val: a flat folder + --labels; flat: no labels (label -1); parquet: a Hugging Face Parquet "
        "image dataset (image struct<bytes, path>, label). Default classes",
    )
    ap.add_argument("--labels", help="label file for --layout val")
    ap.add_argument(
        "--split",
        default="",
        help="--layout parquet: the split to write (train, validation, ...) when SRC holds several "
        "(train-00000-of-00004.parquet beside validation-...); never merged",
    )
    ap.add_argument("--classes", help="classes.json to reuse (e.g. the train shards') for consistent labels")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    ap.add_argument(
        "--max-short-side", type=int, default=0, help="downscale images whose short side exceeds this (0 = no limit)"
    )
    ap.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="pixel budget per image: larger images are downscaled to it (counted as re-encoded); "
        f"non-JPEG images above {4} x the budget are skipped, since decoding them would need that much "
        "memory (default %(default)s; 0 = no limit)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    ap.add_argument(
        "--staging",
        help="with an s3:// OUT: the local folder the shards are written to first (restartable), then uploaded",
    )
    args = ap.parse_args(argv)
    if is_remote(args.out) and not args.staging:
        ap.error(
            f"OUT={args.out} is in object storage: give --staging DIR, a local folder to write the shards to first"
        )
    if args.shard_size_mb <= 0:
        ap.error("--shard-size-mb must be > 0")
    if not 1 <= args.quality <= 100:
        ap.error("--quality must be in [1, 100]")
    if args.max_pixels < 0 or args.max_short_side < 0 or args.workers < 1:
        ap.error("--max-pixels and --max-short-side must be >= 0 and --workers >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    args = parse_args(argv)
    try:
        if is_remote(args.out):  # written locally (restartable there), then published
            from data_pipeline.shards.upload import upload

            target, args.out = args.out, args.staging
            run(args)
            upload(args.staging, target, args.workers)
            log.info(
                "uploaded to %s (the staging folder %s can go); train with data.shards=%s", target, args.staging, target
            )
        else:
            run(args)
    except StackError as err:
        log.error("%s", err)
        return err.exit_code
    except OSError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
