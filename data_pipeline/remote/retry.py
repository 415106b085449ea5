"""What a failed object-storage request means, and how long it is waited out.

Two kinds of fault, never confused (a property of the bytes may leave a record behind; a condition
of the moment must not):

* **permanent**: the object does not exist (``MissingObject``), the bucket is missing or access is
  refused (``DataError`` from the stores), or its bytes are not the ones recorded (``ChangedObject``:
  another size or checksum, download after download). The run stops with one line that names the
  object and what to do; nothing is recorded against its samples.
* **transient**: throttling (HTTP 503 SlowDown, 429, other 5xx), timeouts, reset or cut connections,
  a full cache disk (ENOSPC), a lock held too long: the stores raise every one of them as
  ``OSError``. They are retried with capped exponential backoff and *full jitter* (each wait uniform
  in [0, min(cap, base x 2^attempt)], so ranks that failed together do not retry together) until
  ``patience_s`` has passed since the trouble began; then ``TransientFetchError`` (exit code 75 at
  the entry point: the run saves and stops, and the same command continues once the condition has
  cleared).

An episode of trouble is logged when it begins (a warning naming the object and the error) and
when it ends (how long it lasted); the attempts in between are debug lines.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.remote.stores import MissingObject
from engine.errors import DataError, TransientError

log = logging.getLogger(__name__)

# Backoff draws come from a generator of their own, seeded by the OS: the process's ``random``
# module is part of the training state (it is checkpointed) and must not move with the network.
_JITTER = random.Random()


class ChangedObject(DataError):
    """An object's bytes are not those recorded when the shards were written or indexed."""

    def __init__(self, message: str, shard: str = ""):
        super().__init__(message, rank_local=True)
        self.shard = shard


class TransientFetchError(TransientError):
    """A condition of the moment outlasted ``data.fetch_patience_s`` (nothing is recorded as bad)."""

    rank_local = True

    def __init__(self, message: str, shard: str = ""):
        super().__init__(message)
        self.shard = shard


@dataclass
class Episode:
    """One object's trouble, shared by the threads of a process that wait for it (the read-ahead and
    the reader): patience counts from the first failure, whoever met it."""

    started: float | None = None
    attempts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self) -> float:
        with self.lock:
            if self.started is None:
                self.started = time.monotonic()
            return self.started

    def end(self) -> tuple[float, int] | None:
        """(seconds it lasted, attempts) when there was trouble, and clear it."""
        with self.lock:
            if self.started is None:
                return None
            lasted, tries = time.monotonic() - self.started, self.attempts
            self.started, self.attempts = None, 0
            return lasted, tries


def backoff_wait(attempt: int, spec: RemoteSpec, rng: random.Random = _JITTER) -> float:
    """Full jitter: uniform in [0, min(cap, base x 2^attempt)]."""
    return rng.uniform(0.0, min(spec.backoff_cap_s, spec.backoff_s * 2.0**attempt))


def with_retries(
    fn: Callable[[], object],
    what: str,
    spec: RemoteSpec,
    shard: str = "",
    episode: Episode | None = None,
    sleep: Callable[[float], None] = time.sleep,
):
    """``fn()`` until it succeeds. Permanent faults are raised at once; ``OSError`` (transient) is
    waited out with jittered backoff until ``spec.patience_s`` after the episode began, then
    ``TransientFetchError``."""
    episode = episode if episode is not None else Episode()
    while True:
        try:
            out = fn()
        except (MissingObject, ChangedObject, TransientError, DataError):
            raise  # not the moment's fault (or already judged): no retry
        except OSError as err:
            why = describe(err).replace(f"{what}: ", "")  # the stores name the object already
            started = episode.begin()
            with episode.lock:
                attempt = episode.attempts
                episode.attempts += 1
            now = time.monotonic()
            left = started + spec.patience_s - now
            if left <= 0:
                raise TransientFetchError(
                    f"{what}: {why}, for {now - started:.0f} s ({attempt + 1} attempts; "
                    f"data.fetch_patience_s={spec.patience_s:g}); nothing is recorded against the data: run the "
                    "same command again once the storage answers",
                    shard,
                ) from None
            wait = min(backoff_wait(attempt, spec), left)
            if attempt == 0:
                log.warning(
                    "%s: %s; retrying with backoff for up to %g s (data.fetch_patience_s)",
                    what,
                    why,
                    spec.patience_s,
                )
            else:
                log.debug("%s: attempt %d failed (%s); next in %.1f s", what, attempt + 1, why, wait)
            sleep(wait)
            continue
        ended = episode.end()
        if ended is not None:
            log.warning("%s: answered again after %.0f s and %d failed attempts", what, ended[0], ended[1])
        return out


def describe(err: BaseException | None) -> str:
    text = str(err).strip().splitlines()[0][:200] if err is not None and str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
