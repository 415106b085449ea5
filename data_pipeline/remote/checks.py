"""Before launch: a remote shard folder answers, and the node's cache can hold a rank's read-ahead."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.remote.retry import with_retries
from data_pipeline.remote.stores import make_store
from engine.errors import DataError


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
            f"data.block_window = {spec.ahead + window} shards of up to {largest / 2**30:.3g} GB; set at least "
            f"{need / 2**30:.3g} GB per rank on a node"
        )
    root = Path(spec.cache_root)
    probe = next((p for p in (root, *root.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if free < need:
        raise ConfigError(
            f"data.cache_dir={str(root)!r}: {free / 2**30:.1f} GB free, less than one rank's read-ahead "
            f"({need / 2**30:.1f} GB); choose a larger local disk (data.cache_dir) or fewer data.prefetch_shards"
        )
