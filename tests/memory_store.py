"""An object store in this process's memory (``mem://bucket/prefix``) that fails on demand: the
in-process seam through which the unit tier tests object storage (no server, no process). It
implements ``data_pipeline.remote.stores.ObjectStore`` and raises what the real stores raise:
``OSError`` for a condition of the moment (throttling, a full disk), ``MissingObject`` for a 404.

The real S3 store's classification of botocore errors is tested on its own, and against a real
S3-compatible server in the integration tier."""

from __future__ import annotations

import errno
import hashlib
import threading
import time
from collections import Counter
from pathlib import Path
from typing import ClassVar

from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.remote.stores import MissingObject, ObjectStore, register


class Faults:
    """What goes wrong, decided per request. ``throttle_from``: tar downloads numbered from it on (the
    first is 1) are answered 503 SlowDown until ``heal()``; ``throttle_until``: every request is, while
    ``time.monotonic()`` is below it; ``full_disk``: that many downloads write half their bytes, then
    fail with ENOSPC."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.throttle_from: int | None = None
        self.throttle_until = 0.0
        self.full_disk = 0
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    def heal(self) -> None:
        self.throttle_from, self.throttle_until, self.full_disk = None, 0.0, 0

    def before(self, op: str, where: str) -> None:
        tar = op == "download" and where.endswith(".tar")
        with self.lock:
            self.calls[op] += 1
            self.calls["tar"] += tar
            n = self.calls["tar"]
        if time.monotonic() < self.throttle_until or (
            tar and self.throttle_from is not None and n >= self.throttle_from
        ):
            self.calls["throttled"] += 1
            raise OSError(f"{where}: SlowDown (HTTP 503)")

    def write(self, dest: Path, data: bytes) -> None:
        with self.lock:
            full = self.full_disk > 0
            self.full_disk -= full
        if full:
            dest.write_bytes(data[: len(data) // 2])
            self.calls["full_disk"] += 1
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
        dest.write_bytes(data)


class MemoryStore(ObjectStore):
    buckets: ClassVar[dict[str, dict[str, bytes]]] = {}
    faults: ClassVar[Faults] = Faults()

    def __init__(self, url: str, spec: RemoteSpec):
        self.url, self.spec = url.rstrip("/"), spec
        self.bucket, _, self.prefix = self.url.split("://", 1)[1].partition("/")

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name: str) -> str:
        return f"mem://{self.bucket}/{self.key(name)}"

    def _object(self, name: str) -> bytes:
        try:
            return self.buckets[self.bucket][self.key(name)]
        except KeyError:
            raise MissingObject(f"{self.where(name)} does not exist") from None

    def get(self, name: str) -> bytes:
        self.faults.before("get", self.where(name))
        return self._object(name)

    def get_range(self, name: str, start: int, end: int) -> bytes:
        self.faults.before("range", self.where(name))
        return self._object(name)[start:end]

    def download(self, name: str, dest: Path) -> None:
        self.faults.before("download", self.where(name))
        self.faults.write(dest, self._object(name))

    def put(self, path: Path, name: str) -> None:
        self.buckets.setdefault(self.bucket, {})[self.key(name)] = Path(path).read_bytes()

    def head(self, name: str) -> tuple[int, str]:
        self.faults.before("head", self.where(name))
        data = self._object(name)
        return len(data), hashlib.md5(data).hexdigest()

    def list_tars(self) -> list[str]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        keys = sorted(k for k in self.buckets.get(self.bucket, {}) if k.startswith(prefix) and k.endswith(".tar"))
        return [f"mem://{self.bucket}/{k}" for k in keys if "/" not in k[len(prefix) :]]

    @classmethod
    def replace(cls, url: str, data: bytes) -> None:
        """Put other bytes under an existing object's name (a shard replaced behind the index's back)."""
        bucket, _, key = url.split("://", 1)[1].partition("/")
        assert key in cls.buckets[bucket], key
        cls.buckets[bucket][key] = data


register("mem", MemoryStore)
