"""Verify a shard folder against its manifest and DALI index files.

    python -m data_pipeline.verify OUT [--decode] [--workers 8]

For every shard (tars beside the manifest, or where ``index_shards`` found them): the tar exists
and matches the size (and checksum) recorded when it was written or indexed;
its members, walked from the tar headers, agree with the index file (names, data offsets, sizes);
every sample in the manifest is in the index at the recorded offset and size, with the recorded
checksum of its image bytes and label; nothing is in the tar that the manifest does not list (samples
skipped when indexing are listed in skipped.json instead).
``--decode`` also decodes every image. Prints one line per problem and a summary; exits 1 when
anything is wrong, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import sys
from collections import defaultdict
from pathlib import Path

from data_pipeline.dataset.hashing import checksum
from data_pipeline.dataset.members import decode_error, scan_tar_index
from data_pipeline.dataset.wds_index import IndexError_, read_index

log = logging.getLogger("verify")


def verify_shard(args: tuple[str, str, str, list[dict], bool, str, set[str]]) -> list[str]:
    root, name, tar_path, rows, decode, label_source, skipped = args
    root_p = Path(root)
    tar, idx, part = Path(tar_path), root_p / f"{name}.idx", root_p / f"{name}.part.json"
    problems: list[str] = []
    if not tar.is_file():
        return [f"{name}: tar file {tar} is missing"]
    data = tar.read_bytes()
    if part.is_file():
        rec = json.loads(part.read_text())
        if rec.get("tar_bytes") != len(data):
            what = "indexed" if "tar_mtime_ns" in rec else "written"
            problems.append(f"{name}: tar is {len(data)} bytes, {rec.get('tar_bytes')} when {what}")
        elif "tar_checksum" in rec and rec["tar_checksum"] != checksum(data):
            problems.append(f"{name}: tar checksum differs from the one recorded when it was written")
    walked = {s.key: s for s in scan_tar_index(tar)}
    last = max((c.offset + c.size for s in walked.values() for c in s.components), default=0)
    if last > len(data) or (rows and not walked):
        problems.append(f"{name}: the tar ends early ({len(data)} bytes): truncated")
    try:
        indexed = {s.key: s for s in read_index(idx)}
    except IndexError_ as err:
        problems.append(f"{name}: {err}")
        indexed = {}
    if indexed and indexed != walked:
        diff = sorted(set(indexed) ^ set(walked)) or sorted(k for k in indexed if indexed[k] != walked.get(k))
        problems.append(f"{name}: index disagrees with the tar headers for {len(diff)} sample(s), e.g. {diff[:3]}")
    listed = set()
    for row in rows:
        key = row["key"]
        listed.add(key)
        s = walked.get(key)
        if s is None:
            problems.append(f"{name}/{key}: in the manifest but not in the tar")
            continue
        comps = {c.ext.lower(): c for c in s.components}
        img = next((c for c in comps.values() if (c.offset, c.size) == (row["offset"], row["size"])), None)
        if img is None:
            problems.append(f"{name}/{key}: no tar member at the manifest's {row['offset']}+{row['size']}")
            continue
        cls = comps.get("cls") if label_source == "cls" else None
        if label_source == "cls" and cls is None:
            problems.append(f"{name}/{key}: the tar holds no .cls for it (truncated tar?)")
            continue
        payload = data[img.offset : img.offset + img.size]
        if checksum(payload) != row["checksum"]:
            problems.append(f"{name}/{key}: image bytes do not match the manifest checksum")
        if cls is not None and data[cls.offset : cls.offset + cls.size].decode(errors="replace").strip() != str(
            row["label"]
        ):
            problems.append(f"{name}/{key}: label differs from the manifest ({row['label']})")
        if decode:
            reason = decode_error(payload)
            if reason:
                problems.append(f"{name}/{key}: {reason}")
    extra = sorted(set(walked) - listed - skipped)
    if extra:
        problems.append(f"{name}: {len(extra)} sample(s) in the tar are not in the manifest, e.g. {extra[:3]}")
    return problems


def verify(out: str | Path, decode: bool = False, workers: int = 1) -> list[str]:
    import pyarrow.parquet as pq

    out = Path(out)
    for need in ("manifest.parquet", "dataset.json"):
        if not (out / need).is_file():
            return [f"{out}: {need} is missing (not a finished shard folder)"]
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_shard[r["shard"]].append(r)
    meta = json.loads((out / "dataset.json").read_text())
    problems = []
    if not rows:
        problems.append(f"{out}: no sample at all (a folder that trains nothing); see its skipped.json")
    if meta["num_samples"] != len(rows):
        problems.append(f"dataset.json says {meta['num_samples']} samples, the manifest has {len(rows)}")
    names = sorted(set(meta["shards"]) | set(by_shard))
    tars, label = meta.get("tars", {}), str(meta.get("label", "cls"))
    skipped_at = _skipped_keys(out)
    jobs = []
    for n in names:
        tar = tars.get(n, str(out / f"{n}.tar"))
        jobs.append((str(out), n, tar, by_shard.get(n, []), decode, label, skipped_at.get(tar, set())))
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(verify_shard, jobs)
    else:
        results = [verify_shard(j) for j in jobs]
    for r in results:
        problems += r
    return problems


def _skipped_keys(out: Path) -> dict[str, set[str]]:
    """tar path -> keys index_shards left out on purpose (listed in skipped.json as 'tar:key')."""
    try:
        items = json.loads((out / "skipped.json").read_text())
    except (OSError, ValueError):
        return {}
    found: dict[str, set[str]] = defaultdict(set)
    for item in items:
        tar, sep, key = str(item.get("source", "")).rpartition(".tar:")
        if sep:
            found[tar + ".tar"].add(key)
    return found


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.verify",
        description="Check a shard folder against its manifest and index files: tar sizes and checksums, member "
        "offsets, per-sample checksums and labels, stray or missing samples. Exit code 1 when anything differs.",
    )
    ap.add_argument("out", help="a folder written by python -m data_pipeline.make_shards")
    ap.add_argument("--decode", action="store_true", help="also decode every image (slow: a full decode pass)")
    ap.add_argument("--workers", type=int, default=1, help="processes checking shards in parallel (default 1)")
    args = ap.parse_args(argv)
    problems = verify(args.out, args.decode, args.workers)
    for p in problems:
        log.error("%s", p)
    log.info("%s: %s", args.out, f"{len(problems)} problem(s)" if problems else "all shards verified")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
