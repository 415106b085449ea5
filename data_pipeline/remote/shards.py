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

The cache is shared by the ranks of a node (``data_pipeline.remote.cache``). Every fetched tar is
checked against the size and the content checksum dataset.json records (``make_shards`` and
``index_shards`` record both; for folders indexed before checksums were recorded, the first full
fetch on a node records one there and later fetches are held to it). A tar whose bytes differ,
download after download, is a changed shard: the run stops with one line naming it and what to do,
and nothing is recorded against its samples (they would train under the keys of other images).
A missing object stops the same way. Throttling, timeouts, cut connections and a full cache disk are
conditions of the moment: waited out (``data_pipeline.remote.retry``) and, past the patience, a
``TransientFetchError`` that leaves no trace.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np

from data_pipeline.dataset.hashing import file_checksum
from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.dataset.table import SampleTable, check_shard_name, read_table
from data_pipeline.remote.cache import ShardCache, file_lock
from data_pipeline.remote.retry import ChangedObject, Episode, with_retries
from data_pipeline.remote.rows import LazyColumn, LazyKeys, ShardIdColumn, ShardRows, lazy_layout
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
        self.broken: dict[str, Exception] = {}  # shards that changed or vanished: the same error again
        self.fetched_bytes = 0
        self._episodes: dict[str, Episode] = {}  # per shard: trouble shared by read-ahead and reader
        self.rows: ShardRows | None = None  # the rows, read by shard (set by ``table``)
        self.tar_index = {str(s): i for i, s in enumerate(meta.get("shards", []))}
        self._lock = threading.Lock()
        self._cache: ShardCache | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None, "broken": {}, "_episodes": {}, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

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
        """The folder's small files into the node's cache. Its rows stay in the store when its columns
        can be read by range (``data_pipeline.remote.rows``); older folders are copied whole."""
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
            if lazy_layout(json.loads((meta_dir / "columns" / "meta.json").read_text())):
                copy("columns/shard_rows.npy", required=True)
                log.info("data: the shard list of %s copied to %s; rows are read by shard", store.url, meta_dir)
                return
            for name in COLUMN_FILES[1:]:
                copy(f"columns/{name}", required=name != "format.npy")
        else:  # written before the columns existed: the Parquet manifest
            copy("manifest.parquet", required=True)
        log.info(
            "data: metadata of %s copied to %s (whole: written before columns could be read by shard; "
            "python -m data_pipeline.columns and deepmim-upload make it so)",
            store.url,
            meta_dir,
        )

    def table(self) -> SampleTable:
        """The folder's sample table: its rows read by shard from the store, or from the local copy."""
        columns = self.meta_dir / "columns" / "meta.json"
        layout = json.loads(columns.read_text()) if columns.is_file() else {}
        if not lazy_layout(layout):
            return read_table(self.meta_dir, source=self)
        meta = json.loads((self.meta_dir / "dataset.json").read_text())
        shards = tuple(check_shard_name(s, self.meta_dir / "dataset.json") for s in meta["shards"])
        starts = np.load(self.meta_dir / "columns" / "shard_rows.npy")
        if len(starts) != len(shards) + 1 or int(starts[-1]) != int(meta["num_samples"]):
            raise DataError(f"{self.store.where('columns/shard_rows.npy')} does not match dataset.json; publish again")
        self.rows = ShardRows(self.store, self.spec, shards, starts, layout, self.tar_bytes)
        r = self.rows
        return SampleTable(
            root=self.meta_dir,
            shards=shards,
            shard_id=ShardIdColumn(r),
            offset=LazyColumn(r, "offset", np.int64),
            size=LazyColumn(r, "size", np.int64),
            width=LazyColumn(r, "width", np.int32),
            height=LazyColumn(r, "height", np.int32),
            label=LazyColumn(r, "label", np.int64),
            keys=LazyKeys(r),
            num_classes=int(meta.get("num_classes", 0)),
            label_source=str(meta.get("label", "cls")),
            formats=LazyColumn(r, "format", np.uint8) if r.has_format else None,
            shard_rows=starts,
            digest=meta.get("manifest_sha256") or layout.get("manifest_sha256"),
            source=self,
            label_values=tuple(int(v) for v in meta["label_values"]) if "label_values" in meta else None,
        )

    def warm_rows(self, name: str) -> None:
        """Fetch a shard's rows ahead of need (the read-ahead calls it with its tar)."""
        if self.rows is not None:
            self.rows.block(self.tar_index[name])

    @property
    def cache(self) -> ShardCache:
        if self._cache is None:
            budget = self.spec.cache_gb * 2**30 if self.spec.cache_gb > 0 else self.auto_budget()
            self._cache = ShardCache(Path(self.spec.cache_root) / "shards", self.namespace, int(budget))
        return self._cache

    def largest(self) -> int:
        return max(self.tar_bytes.values(), default=0)

    def auto_budget(self) -> int:
        """Room for every local rank's read-ahead twice over."""
        return 2 * max(1, self.spec.local_ranks) * (self.spec.ahead + 4) * (self.largest() or 1 << 30)

    def _episode(self, name: str) -> Episode:
        with self._lock:
            return self._episodes.setdefault(name, Episode())

    def local(self, name: str) -> Path:
        """The tar in the node's cache, fetched when absent. Raises ``ChangedObject`` or ``MissingObject``
        (permanent: the run must stop) or ``TransientFetchError`` (the patience ran out)."""
        if name in self.broken:
            raise self.broken[name]
        episode = self._episode(name)
        where = self.store.where(f"{name}.tar")
        try:
            expected = self.tar_bytes.get(name)
            if expected is None:  # a folder that predates recorded sizes: ask, so the budget holds
                size = with_retries(lambda: self.store.head(f"{name}.tar")[0], where, self.spec, name, episode)
                expected = self.tar_bytes[name] = size
            deadline = time.monotonic() + self.spec.patience_s
            return self.cache.ensure(name, expected, lambda tmp: self._fetch(name, tmp, episode), deadline)
        except MissingObject as err:
            self.broken[name] = ChangedObject(
                f"{err}, though dataset.json lists it: restore it, or index the folder again (deepmim-index-shards "
                "or deepmim-make-shards, then deepmim-upload) and resume with data.on_change=next_epoch",
                name,
            )
            raise self.broken[name] from None
        except ChangedObject as err:
            self.broken[name] = err
            raise

    def _fetch(self, name: str, tmp: Path, episode: Episode) -> None:
        """Download into ``tmp`` and check the bytes: transient faults are waited out (patience), a
        size or checksum that differs download after download is a changed shard."""
        expected, recorded = self.tar_bytes.get(name), self.tar_checksum.get(name)
        checksum = recorded or self._node_checksum(name)
        where = self.store.where(f"{name}.tar")

        def download() -> None:
            try:
                self.store.download(f"{name}.tar", tmp)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):  # evict for the next attempt, then retry it
                    freed = self.cache.make_room(expected or 0)
                    raise OSError(err.errno, f"the shard cache's disk is full (evicted {freed / 1e6:.0f} MB)") from None
                raise

        t0 = time.perf_counter()
        why = ""
        for attempt in range(max(1, self.spec.retries)):
            with_retries(download, where, self.spec, name, episode)
            got = tmp.stat().st_size
            if expected is not None and got != expected:
                why = f"{got} bytes where dataset.json records {expected}"
            elif checksum and file_checksum(tmp) != checksum:
                why = f"its content checksum differs from the one {'dataset.json' if recorded else 'this node'} records"
            else:
                if not checksum:
                    self._record_node_checksum(name, file_checksum(tmp))
                self.fetched_bytes += got
                log.debug("fetched %s: %.1f MB in %.2f s", name, got / 1e6, time.perf_counter() - t0)
                return
            log.warning("%s: download %d of %d: %s", where, attempt + 1, self.spec.retries, why)
        raise ChangedObject(
            f"{where} changed since it was written or indexed: {why}, in {self.spec.retries} downloads; its samples "
            "would train under the keys of other images. Restore the object, or index the folder again "
            "(deepmim-index-shards, or deepmim-make-shards then deepmim-upload) and resume with "
            "data.on_change=next_epoch (or start a new run folder)",
            name,
        )

    # A folder indexed before checksums were recorded: the first full fetch on this node records one
    # (CACHE/meta/<folder>/checksums.json), and every later fetch on the node is held to it.
    def _node_checksums(self) -> Path:
        return self.meta_dir / "checksums.json"

    def _node_checksum(self, name: str) -> str | None:
        try:
            return json.loads(self._node_checksums().read_text()).get(name)
        except (OSError, ValueError):
            return None

    def _record_node_checksum(self, name: str, value: str) -> None:
        path = self._node_checksums()
        with file_lock(path.with_suffix(".lock")):
            try:
                known = json.loads(path.read_text())
            except (OSError, ValueError):
                known = {}
            known.setdefault(name, value)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, path)
