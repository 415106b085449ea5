"""Not waiting in silence for a rank that stopped.

When one rank stalls (a SIGSTOP, a hung file system, a dead node), the others block inside the
next collective until its timeout, 30 minutes later, and say nothing. Every rank runs a watchdog
thread that

* writes a heartbeat, ``RUN_DIR/heartbeat/rank<K>.json`` (its step and the time of its last step),
  every few seconds: the run folder is on a file system every node sees, and this side channel
  does not depend on the collectives that are stuck;
* when its own rank has made no step for ``fault.stall_factor`` times the median step time (and
  at least ``fault.stall_min_s``), logs which ranks are behind or silent;
* after ``fault.stall_exit_s`` without a step, exits the process with ``EXIT_STALLED``; the
  launcher then stops the other ranks. Nothing is written on the way out, so the newest complete
  checkpoint stays in charge.

Saves, evaluations and rollbacks are long for good reasons: during them the step-time warning is
off, but the exit limit still counts, so a rank that stalls inside a save does not hang the job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

from engine.errors import StalledError

log = logging.getLogger(__name__)

EXIT_STALLED = StalledError.exit_code


class Watchdog:
    def __init__(
        self, run_dir: Path, rank: int, world_size: int, factor: float, min_s: float, exit_s: float, poll_s: float = 2.0
    ):
        self.dir = Path(run_dir) / "heartbeat"
        self.rank, self.world = rank, world_size
        self.factor, self.min_s, self.exit_s, self.poll_s = factor, min_s, exit_s, poll_s
        self.step = 0
        self.last = time.monotonic()
        self.durations: deque[float] = deque(maxlen=50)
        self.paused = True
        self.doing = ""  # the long work under way (held), if any
        self.held_since = 0.0
        self.warned_at = 0.0
        self._stop = threading.Event()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    # main thread
    def beat(self, step: int) -> None:
        now = time.monotonic()
        if not self.paused:
            self.durations.append(now - self.last)
        self.step, self.last, self.paused, self.warned_at = step, now, False, 0.0

    @contextlib.contextmanager
    def held(self, what: str = "a save"):
        """Long, legitimate work (a save, an evaluation): no step-time warning while it runs, the
        exit limit still applies; the step clock restarts after it."""
        was_paused, was_doing = self.paused, self.doing
        self.paused, self.doing, self.held_since = True, what, time.monotonic()
        try:
            yield
        finally:
            self.doing = was_doing
            if not was_paused:
                self.last, self.paused = time.monotonic(), False

    def close(self) -> None:
        self._stop.set()

    # watchdog thread
    def _run(self) -> None:
        self._write_heartbeat()
        while not self._stop.wait(self.poll_s):
            try:
                self._write_heartbeat()
                self._check()
            except Exception as err:  # the watchdog must never take the run down by itself
                log.debug("watchdog: %s", err)

    def _write_heartbeat(self) -> None:
        info = {
            "rank": self.rank,
            "step": self.step,
            "wall": time.time(),
            "since_step_s": time.monotonic() - self.last,
            "paused": self.paused,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        path = self.dir / f"rank{self.rank}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)

    def threshold(self) -> float | None:
        if self.paused or len(self.durations) < 3:
            return None  # no reference yet (compilation, the first steps)
        return max(self.min_s, self.factor * statistics.median(self.durations))

    def _check(self) -> None:
        now = time.monotonic()
        if self.doing:  # a save or an evaluation: only the exit limit
            waited, limit = now - self.held_since, None
            where = f"in {self.doing} after step {self.step}"
        else:
            limit = self.threshold()
            if limit is None:
                return
            waited, where = now - self.last, f"for step {self.step + 1}"
            if waited > limit and now - self.warned_at > max(limit, 30.0):
                self.warned_at = now
                log.error(
                    "watchdog: rank %d has waited %.0f s %s (median step %.2f s): %s",
                    self.rank,
                    waited,
                    where,
                    statistics.median(self.durations),
                    self.others(),
                )
        if self.exit_s and waited > max(self.exit_s, limit or 0.0):
            log.error(
                "watchdog: rank %d has waited %.0f s %s (fault.stall_exit_s=%.0f): %s; exiting with code %d so "
                "the job ends (the newest complete checkpoint is untouched)",
                self.rank,
                waited,
                where,
                self.exit_s,
                self.others(),
                EXIT_STALLED,
            )
            for h in logging.getLogger().handlers:
                h.flush()
            sys.stderr.flush()
            os._exit(EXIT_STALLED)

    def others(self) -> str:
        """Which ranks have not reached the next step, from their heartbeats."""
        now = time.time()
        notes = []
        for r in range(self.world):
            if r == self.rank:
                continue
            try:
                hb = json.loads((self.dir / f"rank{r}.json").read_text())
            except (OSError, ValueError):
                notes.append(f"rank {r} has written no heartbeat (stalled at start-up?)")
                continue
            silent = now - hb["wall"]
            if silent > 2 * self.poll_s + 1:
                notes.append(
                    f"rank {r} (pid {hb['pid']} on {hb['host']}) is silent for {silent:.0f} s at step "
                    f"{hb['step']}: stopped, hung or gone"
                )
            elif hb["step"] < self.step:
                notes.append(f"rank {r} is behind, at step {hb['step']}")
        return "; ".join(notes) or "every other rank is alive at this step (a slow collective or file system?)"
