"""Single objects by URL (the indexer reads tars already in a bucket this way)."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.remote.retry import ChangedObject, with_retries
from data_pipeline.remote.stores import ObjectStore, make_store


def _parent(url: str, spec: RemoteSpec | None) -> tuple[ObjectStore, str]:
    base, _, name = url.rstrip("/").rpartition("/")
    return make_store(base, spec), name


def list_tars(url: str, spec: RemoteSpec | None = None) -> list[str]:
    return make_store(url, spec).list_tars()


def head_url(url: str, spec: RemoteSpec | None = None) -> tuple[int, str]:
    store, name = _parent(url, spec)
    return with_retries(lambda: store.head(name), url, spec or RemoteSpec())


def fetch_url(url: str, dest: Path, spec: RemoteSpec | None = None) -> str:
    """Download one object (transient faults waited out); returns its version tag (ETag). An object
    whose size is not the one announced, download after download, is being replaced: ChangedObject."""
    spec = spec or RemoteSpec()
    store, name = _parent(url, spec)
    for _ in range(max(1, spec.retries)):
        size, tag = with_retries(lambda: store.head(name), url, spec)
        with_retries(lambda: store.download(name, dest), url, spec)
        if size < 0 or dest.stat().st_size == size:
            return tag
    raise ChangedObject(f"{url}: {dest.stat().st_size} bytes downloaded where the store announced {size}")
