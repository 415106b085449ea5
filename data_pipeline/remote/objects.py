"""Single objects by URL (the indexer reads tars already in a bucket this way)."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.remote.retry import _Transient, with_retries
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
