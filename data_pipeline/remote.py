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

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from data_pipeline.locations import RemoteSpec
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


class FetchError(DataError):
    """An object could not be fetched after every retry (its shard's samples are unreadable)."""

    def __init__(self, message: str, shard: str = ""):
        super().__init__(message, rank_local=True)
        self.shard = shard


class MissingObject(DataError):
    """The object does not exist (HTTP 404): not worth retrying."""


# ------------------------------------------------------------------------------ stores


def split_url(url: str) -> tuple[str, str, str]:
    """'s3://bucket/a/b' -> ('s3', 'bucket', 'a/b'); 'https://host/a' -> ('https', 'https://host', 'a')."""
    m = re.fullmatch(r"(s3|https?)://([^/]+)/?(.*)", url.rstrip("/"))
    if not m:
        raise DataError(f"data.shards={url!r}: expected s3://bucket/prefix or https://host/path")
    scheme, host, prefix = m.groups()
    return scheme, (host if scheme == "s3" else f"{scheme}://{host}"), prefix


class ObjectStore:
    """What both stores share; each answers ``head`` (size, version tag) or raises ``MissingObject``."""

    def head(self, name: str) -> tuple[int, str]:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        try:
            self.head(name)
        except MissingObject:
            return False
        return True


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix`` through boto3 (any S3-compatible endpoint)."""

    def __init__(self, url: str, spec: RemoteSpec):
        _, self.bucket, self.prefix = split_url(url)
        self.url, self.spec = url.rstrip("/"), spec
        self._client = None

    def __getstate__(self) -> dict:  # clients do not cross process boundaries
        return {**self.__dict__, "_client": None}

    @property
    def endpoint(self) -> str:
        return self.spec.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": 2, "mode": "standard"},  # our own retries (with backoff) wrap these
                connect_timeout=self.spec.timeout_s,
                read_timeout=self.spec.timeout_s,
                max_pool_connections=32,
            )
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint or None, config=config)
        return self._client

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name: str) -> str:
        at = f" (endpoint {self.endpoint})" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.key(name)}{at}"

    def get(self, name: str) -> bytes:
        with self._errors(name):
            return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()

    def download(self, name: str, dest: Path) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=32 << 20, max_concurrency=8)
        with self._errors(name):
            self.client.download_file(self.bucket, self.key(name), str(dest), Config=config)

    def put(self, path: Path, name: str) -> None:
        with self._errors(name):
            self.client.upload_file(str(path), self.bucket, self.key(name))

    def head(self, name: str) -> tuple[int, str]:
        """(size, version tag) of an object."""
        with self._errors(name):
            r = self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        return int(r["ContentLength"]), str(r.get("ETag", "")).strip('"')

    def list_tars(self) -> list[str]:
        """URLs of the *.tar objects directly under the prefix, sorted."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        found = []
        with self._errors(""):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            ):
                found += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".tar")]
        return [f"s3://{self.bucket}/{k}" for k in sorted(found)]

    @contextlib.contextmanager
    def _errors(self, name: str):
        """botocore's exceptions -> one line naming the object (never the credentials)."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        try:
            yield
        except (NoCredentialsError, PartialCredentialsError) as err:
            raise DataError(
                f"{self.where(name)}: no usable AWS credentials ({err}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or use an instance role"
            ) from None
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise MissingObject(f"{self.where(name)} does not exist") from None
            if code in ("NoSuchBucket", "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise DataError(f"{self.where(name)}: {code} (check the bucket name and the credentials)") from None
            raise OSError(f"{self.where(name)}: {code or status}") from None


class HttpStore(ObjectStore):
    """Objects under an ``https://`` mirror (read-only), through urllib3."""

    def __init__(self, url: str, spec: RemoteSpec):
        self.url, self.spec = url.rstrip("/"), spec
        self._pool = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}

    @property
    def pool(self):
        if self._pool is None:
            import urllib3

            timeout = urllib3.Timeout(connect=self.spec.timeout_s, read=self.spec.timeout_s)
            self._pool = urllib3.PoolManager(timeout=timeout, retries=urllib3.Retry(total=1, redirect=3))
        return self._pool

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _get(self, name: str, preload: bool):
        import urllib3

        try:
            r = self.pool.request("GET", self.where(name), preload_content=preload)
        except urllib3.exceptions.HTTPError as err:
            raise OSError(f"{self.where(name)}: {type(err).__name__}") from None
        if r.status == 404:
            raise MissingObject(f"{self.where(name)} does not exist (HTTP 404)")
        if r.status in (401, 403):
            raise DataError(f"{self.where(name)}: HTTP {r.status} (the mirror refuses access)")
        if r.status != 200:
            raise OSError(f"{self.where(name)}: HTTP {r.status}")
        return r

    def get(self, name: str) -> bytes:
        return self._get(name, preload=True).data

    def download(self, name: str, dest: Path) -> None:
        import urllib3

        r = self._get(name, preload=False)
        try:
            with open(dest, "wb") as f:
                for block in r.stream(1 << 20):
                    f.write(block)
        except urllib3.exceptions.HTTPError as err:
            raise OSError(f"{self.where(name)}: {type(err).__name__} while reading") from None
        finally:
            r.release_conn()

    def put(self, path: Path, name: str) -> None:
        raise DataError(f"{self.url}: https:// locations are read-only; upload to s3:// instead")

    def head(self, name: str) -> tuple[int, str]:
        import urllib3

        try:
            r = self.pool.request("HEAD", self.where(name))
        except urllib3.exceptions.HTTPError as err:
            raise OSError(f"{self.where(name)}: {type(err).__name__}") from None
        if r.status == 404:
            raise MissingObject(f"{self.where(name)} does not exist (HTTP 404)")
        if r.status != 200:
            raise OSError(f"{self.where(name)}: HTTP {r.status}")
        tag = r.headers.get("ETag") or r.headers.get("Last-Modified") or ""
        return int(r.headers.get("Content-Length", -1)), tag.strip('"')

    def list_tars(self) -> list[str]:
        raise DataError(f"{self.url}: an https:// mirror cannot be listed; name its tars (a brace pattern)")


def make_store(url: str, spec: RemoteSpec | None = None) -> ObjectStore:
    spec = spec or RemoteSpec()
    return S3Store(url, spec) if url.startswith("s3://") else HttpStore(url, spec)


def with_retries(fn: Callable[[], object], what: str, spec: RemoteSpec, shard: str = ""):
    """``fn()`` until it succeeds, ``spec.retries`` attempts with exponential backoff; then FetchError.
    A missing object or refused access is not retried."""
    last: Exception | None = None
    for attempt in range(max(1, spec.retries)):
        try:
            return fn()
        except (MissingObject, FetchError):
            raise
        except DataError as err:
            if not isinstance(err, _Transient):
                raise
            last = err
        except Exception as err:  # connection reset, timeout, truncated body: worth another try
            last = err
        if attempt + 1 < spec.retries:
            wait = spec.backoff_s * 2**attempt
            why = _describe(last)
            log.warning("%s: attempt %d of %d failed (%s); retry in %.1f s", what, attempt + 1, spec.retries, why, wait)
            time.sleep(wait)
    raise FetchError(f"{what}: failed {max(1, spec.retries)} times ({_describe(last)})", shard)


class _Transient(DataError):
    """A fetched object that did not check out (short, wrong checksum): worth fetching again."""


def _describe(err: Exception | None) -> str:
    text = str(err).strip().splitlines()[0][:200] if err is not None and str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ------------------------------------------------------------------------------ node-local cache


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock shared by every process of the node (released when the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardCache:
    """Whole tars in ``root/<namespace>/``, at most ``budget`` bytes over all namespaces."""

    def __init__(self, root: Path, namespace: str, budget: int):
        self.root, self.dir, self.budget = root, root / namespace, int(budget)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.tar"

    def usage(self) -> int:
        """Bytes held: cached tars plus the reservations of fetches in progress (stale ones dropped)."""
        used = 0
        for ns in self.root.iterdir():
            if not ns.is_dir():
                continue
            for f in ns.iterdir():
                if f.suffix == ".tar":
                    with contextlib.suppress(FileNotFoundError):
                        used += f.stat().st_size
                elif f.suffix == ".reserve":
                    try:
                        nbytes, pid = (int(x) for x in f.read_text().split())
                    except (OSError, ValueError):
                        continue
                    if _alive(pid):
                        used += nbytes
                    else:  # a fetch killed mid-way: its reservation and partial file go
                        f.unlink(missing_ok=True)
                        for tmp in ns.glob(f"{f.stem}.tar.{pid}.tmp*"):
                            tmp.unlink(missing_ok=True)
        return used

    def _reserve(self, name: str, nbytes: int, timeout_s: float) -> Path:
        if nbytes > self.budget:
            raise DataError(
                f"shard {name} is {nbytes / 2**30:.2f} GB, more than the whole shard cache "
                f"(data.cache_gb={self.budget / 2**30:.2f}); raise data.cache_gb"
            )
        deadline = time.monotonic() + timeout_s
        while True:
            with file_lock(self.root / ".budget.lock"):
                used = self.usage()
                if used + nbytes > self.budget:
                    used -= self._evict(used + nbytes - self.budget)
                if used + nbytes <= self.budget:
                    marker = self.dir / f"{name}.reserve"
                    marker.write_text(f"{nbytes} {os.getpid()}")
                    return marker
            if time.monotonic() > deadline:  # the rest is reserved by fetches in progress
                raise DataError(
                    f"the shard cache {self.root} (data.cache_gb={self.budget / 2**30:.2f}) stays full of shards "
                    "being fetched by this node's ranks; raise data.cache_gb"
                )
            time.sleep(0.2)

    def _evict(self, need: int) -> int:
        """Remove least recently used tars (any namespace) until ``need`` bytes are free; returns bytes freed."""
        tars = []
        for ns in self.root.iterdir():
            if ns.is_dir():
                for f in ns.glob("*.tar"):
                    with contextlib.suppress(FileNotFoundError):
                        st = f.stat()
                        tars.append((st.st_mtime, st.st_size, f))
        freed = 0
        for _, size, f in sorted(tars):
            if freed >= need:
                break
            f.unlink(missing_ok=True)
            freed += size
            log.debug("shard cache: evicted %s", f)
        return freed

    def ensure(self, name: str, nbytes: int, fetch: Callable[[Path], None], timeout_s: float) -> Path:
        """The cached tar, fetched by ``fetch(tmp_path)`` (one process per node) when absent."""
        path = self.path(name)
        if path.exists():
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)  # recently used: evicted last
                return path
        with file_lock(self.dir / f"{name}.lock"):
            if path.exists():
                os.utime(path)
                return path
            marker = self._reserve(name, nbytes, timeout_s)
            tmp = self.dir / f"{name}.tar.{os.getpid()}.tmp"
            try:
                fetch(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
                marker.unlink(missing_ok=True)
        return path


# ------------------------------------------------------------------------------ a remote shard folder


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
            if checksum and _blake2b(tmp) != checksum:
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


def _blake2b(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------ read-ahead


class Prefetcher:
    """Fetches the shards of a rank's coming batches ahead of need, at most ``ahead`` shards beyond
    those its current batch needs. ``batches`` yields (epoch, rows) from the loader's position on;
    the consumer calls ``reached()`` once per batch it hands to decoding, in the same order."""

    def __init__(self, table, batches: Iterator[tuple[int, np.ndarray]], ahead: int):
        self.table, self.ahead = table, max(1, ahead)
        self._batches = batches
        self._reached = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)
        self._thread.start()

    def reached(self) -> None:
        with self._cond:
            self._reached += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def _run(self) -> None:
        needed: deque[int] = deque()  # shards first needed by batches base..: cumulative counts
        base = 0  # batches already dropped from the front of ``needed``
        pending: deque[int] = deque()  # shards to fetch, in order of first need
        total = fetched = 0
        seen: set[int] = set()  # shards met this epoch
        epoch_now = None
        try:
            for epoch, rows in self._batches:
                if epoch != epoch_now:
                    seen.clear()
                    epoch_now = epoch
                sids = np.asarray(self.table.shard_id[rows])
                _, first = np.unique(sids, return_index=True)
                for s in sids[np.sort(first)].tolist():
                    if s not in seen:
                        seen.add(s)
                        pending.append(s)
                        total += 1
                needed.append(total)
                while pending:
                    base = self._wait_for_room(needed, base, fetched, total)
                    if base is None:
                        return
                    with contextlib.suppress(DataError, OSError):  # the reader meets (and reports) it
                        self.table.source.local(self.table.shards[pending.popleft()])
                    fetched += 1
        except Exception as err:  # never take the run down from here: the reader fetches on demand
            log.warning("shard read-ahead stopped (%s); shards are fetched when read", _describe(err))

    def _wait_for_room(self, needed: deque[int], base: int, fetched: int, total: int) -> int | None:
        """Block until fetching one more shard keeps at most ``ahead`` beyond what the consumer's
        current batch needs, dropping the counts of batches already passed from ``needed``; returns
        the new ``base`` (batches dropped from its front), or None when closed."""
        with self._cond:
            while not self._stop:
                k = self._reached  # batches handed to decoding: they need needed[k - 1] shards
                while base < k - 1 and len(needed) > 1:
                    needed.popleft()
                    base += 1
                j = k - 1 - base
                in_use = 0 if k == 0 else (total if j >= len(needed) else needed[j])
                if fetched < in_use + self.ahead:
                    return base
                self._cond.wait(1.0)
            return None


# ------------------------------------------------------------------------------ single objects by URL


def _parent(url: str, spec: RemoteSpec | None) -> tuple[ObjectStore, str]:
    base, _, name = url.rstrip("/").rpartition("/")
    return make_store(base, spec), name


def list_tars(url: str, spec: RemoteSpec | None = None) -> list[str]:
    return make_store(url, spec).list_tars()


def head_url(url: str, spec: RemoteSpec | None = None) -> tuple[int, str]:
    store, name = _parent(url, spec)
    return with_retries(lambda: store.head(name), url, spec or RemoteSpec())


def fetch_url(url: str, dest: Path, spec: RemoteSpec | None = None) -> str:
    """Download one object (with retries); returns its version tag (ETag)."""
    spec = spec or RemoteSpec()
    store, name = _parent(url, spec)
    size, tag = with_retries(lambda: store.head(name), url, spec)

    def attempt() -> None:
        store.download(name, dest)
        if size >= 0 and dest.stat().st_size != size:
            raise _Transient(f"{dest.stat().st_size} of {size} bytes")

    with_retries(attempt, url, spec)
    return tag


# ------------------------------------------------------------------------------ before launch


def remote_meta(url: str, spec: RemoteSpec) -> dict:
    """A remote shard folder's dataset.json (one small GET)."""
    store = make_store(url, spec)
    raw = with_retries(lambda: store.get("dataset.json"), store.where("dataset.json"), spec)
    try:
        return json.loads(raw)
    except ValueError:
        raise DataError(f"{store.where('dataset.json')} is not JSON; is this a shard folder?") from None


def check_cache(url: str, spec: RemoteSpec, window: int) -> None:
    """Before launch: the folder answers, and the cache can hold one rank's read-ahead.
    Raises ConfigError (a wrong setting) or DataError (the data cannot be read)."""
    import shutil

    from engine.errors import ConfigError

    meta = remote_meta(url, spec)
    largest = max((int(v) for v in meta.get("tar_bytes", {}).values()), default=0)
    if not largest:
        return  # sizes unrecorded (an old folder): checked as shards arrive
    need = (spec.ahead + window) * largest
    if spec.cache_gb and spec.cache_gb * 2**30 < need:
        raise ConfigError(
            f"data.cache_gb={spec.cache_gb:g} is less than one rank's read-ahead: data.prefetch_shards + "
            f"data.block_window = {spec.ahead + window} shards of up to {largest / 2**30:.2f} GB; set at least "
            f"{need / 2**30:.1f} GB per rank on a node"
        )
    root = Path(spec.cache_root)
    probe = next((p for p in (root, *root.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if free < need:
        raise ConfigError(
            f"data.cache_dir={str(root)!r}: {free / 2**30:.1f} GB free, less than one rank's read-ahead "
            f"({need / 2**30:.1f} GB); choose a larger local disk (data.cache_dir) or fewer data.prefetch_shards"
        )
