"""Verify a shard folder against its manifest and DALI index files.

    python -m data_pipeline.verify OUT [--decode] [--workers 8]

For every shard: the tar exists and matches the size and checksum recorded when it was written;
its members, walked from the tar headers, agree with the index file (names, data offsets, sizes);
every sample in the manifest is in the index at the recorded offset and size, with the recorded
checksum of its JPEG bytes and label; nothing is in the tar that the manifest does not list.
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

from data_pipeline.make_shards import checksum
from data_pipeline.preflight import decode_error, scan_tar_index
from data_pipeline.wds_index import IndexError_, read_index

log = logging.getLogger("verify")


def verify_shard(args: tuple[str, str, list[dict], bool]) -> list[str]:
    root, name, rows, decode = args
    root_p = Path(root)
    tar, idx, part = root_p / f"{name}.tar", root_p / f"{name}.idx", root_p / f"{name}.part.json"
    problems: list[str] = []
    if not tar.is_file():
        return [f"{name}: tar file is missing"]
    data = tar.read_bytes()
    if part.is_file():
        rec = json.loads(part.read_text())
        if rec.get("tar_bytes") != len(data):
            problems.append(f"{name}: tar is {len(data)} bytes, {rec.get('tar_bytes')} when written")
        elif rec.get("tar_checksum") != checksum(data):
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
        comps = {c.ext: c for c in s.components}
        if "jpg" not in comps or "cls" not in comps:
            missing = sorted({"jpg", "cls"} - set(comps))
            problems.append(f"{name}/{key}: the tar holds no .{' or .'.join(missing)} for it (truncated tar?)")
            continue
        jpg, cls = comps["jpg"], comps["cls"]
        if (jpg.offset, jpg.size) != (row["offset"], row["size"]):
            problems.append(f"{name}/{key}: at {jpg.offset}+{jpg.size}, manifest says {row['offset']}+{row['size']}")
            continue
        payload = data[jpg.offset : jpg.offset + jpg.size]
        if checksum(payload) != row["checksum"]:
            problems.append(f"{name}/{key}: JPEG bytes do not match the manifest checksum")
        if data[cls.offset : cls.offset + cls.size].decode(errors="replace") != str(row["label"]):
            problems.append(f"{name}/{key}: label differs from the manifest ({row['label']})")
        if decode:
            reason = decode_error(payload)
            if reason:
                problems.append(f"{name}/{key}: {reason}")
    extra = sorted(set(walked) - listed)
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
    if meta["num_samples"] != len(rows):
        problems.append(f"dataset.json says {meta['num_samples']} samples, the manifest has {len(rows)}")
    names = sorted(set(meta["shards"]) | set(by_shard))
    jobs = [(str(out), n, by_shard.get(n, []), decode) for n in names]
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(verify_shard, jobs)
    else:
        results = [verify_shard(j) for j in jobs]
    for r in results:
        problems += r
    return problems


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
