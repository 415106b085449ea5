"""Shards in object storage: fetched whole, in plan order, into a node-local cache of bounded size.

``data.shards=s3://bucket/prefix`` (any S3-compatible endpoint) or ``https://host/path`` (a read-only
mirror). The shard folder's metadata (dataset.json, the columns or the Parquet manifest) is copied
once per node into ``CACHE/meta/``; the ranks then map it like a local folder. Tars are fetched
whole into ``CACHE/shards/`` when a rank first needs them, ahead of need by ``Prefetcher``, which
walks the rank's own future batches. With the block order a rank reads a few shards at a time, so
whole-shard fetches are sequential reads of large objects, the access pattern object stores serve
fastest; the global order would touch every shard at random, so remote data requires the block order.

The client library is boto3 for S3 (it reads ``AWS_ENDPOINT_URL``, the credentials environment
variables, ``~/.aws`` profiles and instance roles exactly as the AWS CLI does, and its transfer
manager downloads large objects in parallel ranges) and urllib3 for HTTPS (already a dependency of
boto3). Credentials are never logged: messages name the bucket, key and endpoint only.

The cache is shared by the ranks of a node: a file lock per shard makes one process fetch it while
the others wait; a node-wide lock serializes the budget: before a fetch, the least recently used
shards are removed until the new one fits in ``data.cache_gb``. Fetched tars are checked against the
sizes (and checksums, where the shard writer recorded them) in dataset.json. A fetch that keeps
failing after its retries (with exponential backoff) makes the shard's samples unreadable: the
loaders record them like samples that do not decode (the run stops with a one-line error and skips
them on restart), never a hang and never a silent skip. An object shorter than recorded (truncated
upload) is kept: the samples inside it train, the ones past its end are recorded as unreadable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from data_pipeline.dataset.hashing import file_checksum
from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.remote.cache import ShardCache, file_lock
from data_pipeline.remote.retry import FetchError, _Transient, with_retries
from data_pipeline.remote.stores import MissingObject, make_store
from engine.errors import DataError

log = logging.getLogger(__name__)
# boto3 announces where it found credentials at INFO, once per process and rank: not worth a line each
logging.getLogger("botocore.credentials").setLevel(logging.WARNING)


META_FILES = ("dataset.json", "classes.json")


COLUMN_FILES = (
    "meta.json",
    "keys.arrow",
    "shard_rows.npy",
    "shard.npy",
    "offset.npy",
    "size.npy",
    "width.npy",
    "height.npy",
    "label.npy",
    "format.npy",
)


def _slug(url: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1])[-80:]
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


class RemoteShards:
    """A shard folder in object storage, as a local metadata copy plus a shard cache."""

    def __init__(self, url: str, spec: RemoteSpec, meta_dir: Path, meta: dict):
        self.url, self.spec, self.meta_dir = url.rstrip("/"), spec, meta_dir
        self.store = make_store(url, spec)
        self.tar_bytes: dict[str, int] = {str(k): int(v) for k, v in meta.get("tar_bytes", {}).items()}
        self.tar_checksum: dict[str, str] = {str(k): str(v) for k, v in meta.get("tar_checksum", {}).items()}
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:8]
        self.namespace = f"{_slug(url)}-{digest}"  # a re-uploaded dataset never reads the old tars
        self.failed: dict[str, FetchError] = {}
        self.fetched_bytes = 0
        self._cache: ShardCache | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None, "failed": {}}

    @classmethod
    def open(cls, url: str, spec: RemoteSpec) -> RemoteShards:
        """Copy the folder's metadata into the node's cache (once per node and dataset version)."""
        store = make_store(url, spec)
        meta_dir = Path(spec.cache_root) / "meta" / _slug(url)
        raw = with_retries(lambda: store.get("dataset.json"), store.where("dataset.json"), spec)
        try:
            meta = json.loads(raw)
        except ValueError:
            raise DataError(f"{store.where('dataset.json')} is not JSON; is this a shard folder?") from None
        with file_lock(meta_dir.with_name(meta_dir.name + ".lock")):
            done = meta_dir / ".complete"
            if not (done.is_file() and done.read_bytes() == raw):
                cls._copy_meta(store, spec, meta_dir)
                (meta_dir / "dataset.json").write_bytes(raw)
                done.write_bytes(raw)
        return cls(url, spec, meta_dir, meta)

    @staticmethod
    def _copy_meta(store, spec: RemoteSpec, meta_dir: Path) -> None:
        import shutil

        shutil.rmtree(meta_dir, ignore_errors=True)
        (meta_dir / "columns").mkdir(parents=True)

        def copy(name: str, required: bool) -> bool:
            try:
                with_retries(lambda: store.download(name, meta_dir / name), store.where(name), spec)
            except MissingObject:
                if required:
                    raise
                return False
            return True

        for name in META_FILES[1:]:
            copy(name, required=False)
        if copy("columns/meta.json", required=False):
            for name in COLUMN_FILES[1:]:
                copy(f"columns/{name}", required=name != "format.npy")
        else:  # written before the columns existed: the Parquet manifest
            copy("manifest.parquet", required=True)
        log.info("data: metadata of %s copied to %s", store.url, meta_dir)

    @property
    def cache(self) -> ShardCache:
        if self._cache is None:
            budget = self.spec.cache_gb * 2**30 if self.spec.cache_gb > 0 else self.auto_budget()
            self._cache = ShardCache(Path(self.spec.cache_root) / "shards", self.namespace, int(budget))
        return self._cache

    def largest(self) -> int:
        return max(self.tar_bytes.values(), default=0)

    def auto_budget(self) -> int:
        """Room for every local rank's read-ahead twice over (LOCAL_WORLD_SIZE: the launcher's)."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        return 2 * local * (self.spec.ahead + 4) * (self.largest() or 1 << 30)

    def local(self, name: str) -> Path:
        """The tar in the node's cache, fetched (with retries) when absent; FetchError when it cannot be."""
        if name in self.failed:
            raise self.failed[name]
        expected = self.tar_bytes.get(name)
        try:
            if expected is None:  # a folder that predates recorded sizes: ask, so the budget holds
                expected = self.tar_bytes[name] = with_retries(
                    lambda: self.store.head(f"{name}.tar")[0], self.store.where(f"{name}.tar"), self.spec, name
                )
            return self.cache.ensure(name, expected, lambda tmp: self._fetch(name, tmp), self.spec.timeout_s)
        except FetchError as err:
            err.shard = name
            self.failed[name] = err
            raise
        except MissingObject as err:
            self.failed[name] = FetchError(str(err), name)
            raise self.failed[name] from None

    def _fetch(self, name: str, tmp: Path) -> None:
        expected, checksum = self.tar_bytes.get(name), self.tar_checksum.get(name)
        short: list[int] = []

        def attempt() -> None:
            self.store.download(f"{name}.tar", tmp)
            got = tmp.stat().st_size
            if expected is not None and got != expected:
                short.append(got)
                raise _Transient(f"{got} bytes where dataset.json records {expected}")
            if checksum and file_checksum(tmp) != checksum:
                raise _Transient("content differs from the checksum dataset.json records")

        t0 = time.perf_counter()
        try:
            with_retries(attempt, self.store.where(f"{name}.tar"), self.spec, name)
        except FetchError:
            if short and expected is not None and 0 < short[-1] < expected and tmp.is_file():
                log.warning(
                    "%s is %d bytes, shorter than the %d dataset.json records (a truncated upload?): its samples "
                    "past the end will be recorded as unreadable",
                    self.store.where(f"{name}.tar"),
                    short[-1],
                    expected,
                )
                return  # keep what there is: the samples inside it are fine
            raise
        size = tmp.stat().st_size
        self.fetched_bytes += size
        log.debug("fetched %s: %.1f MB in %.2f s", name, size / 1e6, time.perf_counter() - t0)
