"""Where shards live: a local folder, or object storage (``s3://bucket/prefix``, ``https://host/path``).

A leaf module (no boto3, no torch) so that configuration checks and the table reader can tell the
two apart cheaply; ``data_pipeline.remote`` does the fetching.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

SCHEMES = ["s3://", "https://", "http://"]


def is_remote(location: str) -> bool:
    return str(location).startswith(tuple(SCHEMES))


def register_scheme(prefix: str) -> None:
    """Another scheme served by a store (``data_pipeline.remote.stores.register``)."""
    if prefix not in SCHEMES:
        SCHEMES.append(prefix)


def default_cache_dir() -> str:
    """Node-local, per user: the ranks of a node share it."""
    user = os.environ.get("USER") or str(os.getuid())
    return os.path.join(tempfile.gettempdir(), f"deepmim-shard-cache-{user}")


@dataclass(frozen=True)
class RemoteSpec:
    """How to reach object storage and where to keep what is fetched (one per node, shared)."""

    cache_dir: str = ""  # node-local folder; empty = default_cache_dir()
    cache_gb: float = 0.0  # budget for cached shards; 0 = enough for the ranks' read-ahead (see remote)
    endpoint: str = ""  # S3-compatible endpoint URL; empty = AWS_ENDPOINT_URL or AWS itself
    # downloads of an object whose bytes differ from the recorded size or checksum before it counts as
    # changed (a corruption in transit is gone on the next download; a replaced object is not)
    retries: int = 3
    timeout_s: float = 60.0  # connect and read timeout per request
    patience_s: float = 600.0  # how long throttling, timeouts, a full cache disk or a busy lock are waited out
    backoff_s: float = 1.0  # backoff base: the n-th wait is uniform in [0, min(cap, base x 2^n)]
    backoff_cap_s: float = 60.0
    ahead: int = 8  # shards fetched ahead of the one being read, per rank
    local_ranks: int = 1  # ranks on this node sharing the cache (the trainer sets it from its launcher)

    @property
    def cache_root(self) -> str:
        return self.cache_dir or default_cache_dir()


def remote_spec(d) -> RemoteSpec | None:
    """The object-storage settings of a DataConfig (None for local shards)."""
    if not is_remote(d.shards):
        return None
    return RemoteSpec(
        cache_dir=d.cache_dir,
        cache_gb=d.cache_gb,
        endpoint=d.s3_endpoint,
        retries=d.fetch_retries,
        timeout_s=d.fetch_timeout_s,
        patience_s=d.fetch_patience_s,
        ahead=d.prefetch_shards,
    )
