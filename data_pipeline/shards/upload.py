"""Copy a finished shard folder to object storage, where training streams it from.

    python -m data_pipeline.upload OUT s3://bucket/prefix [--workers 8]

Uploads every tar (tars indexed in place by ``index_shards`` are uploaded under their shard names),
the columns (written first if the folder predates them), the manifest, classes.json and the DALI
index files, and dataset.json last: a folder counts as finished in the bucket only once its
dataset.json is there, so a training job never sees half an upload. Restartable: an object already
in the bucket with the local file's size is not sent again.

The same result as ``aws s3 sync OUT s3://bucket/prefix`` for a folder written by ``make_shards``
(that command uploads dataset.json in no particular order, so start training after it finishes).
Credentials and the endpoint come from the usual AWS environment (``AWS_ENDPOINT_URL``, profiles).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_pipeline.dataset.locations import RemoteSpec
from engine.errors import DataError, StackError

log = logging.getLogger("upload")


def _remote_size(store, name: str, spec) -> int | None:
    """The size of an object already in the store, or None when there is none."""
    from data_pipeline.remote.retry import with_retries
    from data_pipeline.remote.stores import MissingObject

    try:
        return int(with_retries(lambda: store.head(name)[0], store.where(name), spec))
    except MissingObject:
        return None


def upload(folder: str | Path, url: str, workers: int = 8, endpoint: str = "") -> dict:
    """Upload ``folder`` to ``url``; returns the dataset.json written there."""
    from data_pipeline.dataset.columns import write_columns
    from data_pipeline.dataset.table import check_shard_name
    from data_pipeline.remote.retry import with_retries
    from data_pipeline.remote.stores import make_store

    root = Path(folder)
    url = url.rstrip("/")
    if url.startswith(("https://", "http://")):
        raise DataError(f"{url}: https:// mirrors are read-only; upload to an s3:// location")
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{root}: not a finished shard folder ({err})") from None
    if not meta.get("num_samples") or not meta.get("shards"):
        raise DataError(f"{root}: the shard folder holds no sample; nothing to upload (see its skipped.json)")
    shards = [check_shard_name(s, root / "dataset.json") for s in meta["shards"]]
    base = meta.pop("tar_base", None)  # indexed in place in object storage: the tars are there already
    if base is not None and base.rstrip("/") != url:
        raise DataError(
            f"{root} indexes tars in {base}; upload it there (training fetches each tar from the folder's "
            f"own prefix), not to {url}"
        )
    if not (root / "columns" / "meta.json").is_file() or "manifest_sha256" not in meta:
        meta["manifest_sha256"] = write_columns(root, shards)["manifest_sha256"]
    spec = RemoteSpec(endpoint=endpoint)
    store = make_store(url, spec)
    tars = meta.pop("tars", {})  # in the bucket every tar sits under its shard name
    files: list[tuple[Path, str]] = []
    tar_bytes = dict(meta.get("tar_bytes", {}))
    for name in shards:
        if base is None:
            tar = Path(tars.get(name) or root / f"{name}.tar")
            tar_bytes[name] = tar.stat().st_size
            files.append((tar, f"{name}.tar"))
        if (root / f"{name}.idx").is_file():
            files.append((root / f"{name}.idx", f"{name}.idx"))
    files += [(p, f"columns/{p.name}") for p in sorted((root / "columns").iterdir())]
    files += [(root / n, n) for n in ("manifest.parquet", "classes.json") if (root / n).is_file()]

    def send(item: tuple[Path, str]) -> int:
        path, name = item
        size = path.stat().st_size
        if _remote_size(store, name, spec) == size:
            return 0
        with_retries(lambda: store.put(path, name), store.where(name), spec)
        return size

    with ThreadPoolExecutor(max(1, workers)) as pool:
        sent = sum(pool.map(send, files))
    meta["tar_bytes"] = {name: tar_bytes[name] for name in shards}  # what fetches are checked against
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dataset.json"
        path.write_text(json.dumps(meta, indent=2, sort_keys=True))
        with_retries(lambda: store.put(path, "dataset.json"), store.where("dataset.json"), spec)
    log.info("%s -> %s: %d files, %.1f MB sent (the rest was there already)", root, url, len(files) + 1, sent / 1e6)
    return meta


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.upload",
        description="Upload a finished shard folder to s3://bucket/prefix (dataset.json last; restartable).",
    )
    ap.add_argument("folder", help="a shard folder written by make_shards or index_shards")
    ap.add_argument("url", help="s3://bucket/prefix")
    ap.add_argument("--workers", type=int, default=8, help="parallel uploads (default 8)")
    ap.add_argument("--endpoint", default="", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL, else AWS)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    try:
        upload(args.folder, args.url, args.workers, args.endpoint)
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"uploaded {args.folder} to {args.url}; train with: --set data.shards={args.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
