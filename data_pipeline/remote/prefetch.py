"""Read-ahead: a rank's coming shards fetched into the node's cache before its loader needs them."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Iterator

import numpy as np

from data_pipeline.remote.retry import describe
from engine.errors import DataError

log = logging.getLogger(__name__)


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
                    name = self.table.shards[pending.popleft()]
                    with contextlib.suppress(DataError, OSError):  # the reader meets (and reports) it
                        self.table.source.local(name)
                        self.table.source.warm_rows(name)
                    fetched += 1
        except Exception as err:  # never take the run down from here: the reader fetches on demand
            log.warning("shard read-ahead stopped (%s); shards are fetched when read", describe(err))

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
