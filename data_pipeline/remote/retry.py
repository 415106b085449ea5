"""Retries of object-storage requests."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.remote.stores import MissingObject
from engine.errors import DataError

log = logging.getLogger(__name__)


class FetchError(DataError):
    """An object could not be fetched after every retry (its shard's samples are unreadable)."""

    def __init__(self, message: str, shard: str = ""):
        super().__init__(message, rank_local=True)
        self.shard = shard


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
