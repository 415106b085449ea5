"""Stop requests from outside: preemption signals, Ctrl-C, and a launcher that went away.

SIGTERM, SIGUSR1 and SIGINT all mean "finish the current step, save, exit 0": the handler only
sets a flag that the guard all-reduces with the next step's fault flags, so every rank stops at
the same step. A second, later SIGINT stops at once (KeyboardInterrupt), for the impatient.

The ``deepspeed`` runner does not pass SIGTERM or SIGINT on: on one node it just dies, and its
per-node launcher (``deepspeed.launcher.launch``, the ranks' parent) and the ranks train on as
orphans. Each rank therefore asks the kernel for a SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``), and a watcher thread treats the loss of its parent or grandparent (the
runner) the same way, so a job whose launcher is gone saves and exits instead of training on
unsupervised.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PR_SET_PDEATHSIG = 1


def ask_for_sigterm_when_parent_dies() -> bool:
    """Linux only; returns False where prctl is unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc (None where it cannot be read)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # fields after the command name: state, ppid, ...


class StopRequest:
    """A stop asked for from outside (a signal, a lost launcher); read by the guard and the loop."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def ask(self, reason: str) -> None:
        if not self.requested:
            self.requested, self.reason = True, reason


class StopSignals:
    """Installs the handlers; ``request.requested`` becomes True on a stop request.

    One Ctrl-C from a terminal reaches a rank twice: from the terminal (every process of the
    foreground group) and from a launcher that forwards it. Copies of a signal that arrive within
    ``repeat_window_s`` of the first count as that one request; a SIGINT that comes later aborts
    at once (KeyboardInterrupt), for the impatient."""

    def __init__(
        self, request: StopRequest, watch_parent: bool = True, poll_s: float = 2.0, repeat_window_s: float = 3.0
    ):
        self.request = request
        self.repeat_window_s = repeat_window_s
        self.first_at: float | None = None
        self._previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}
        self._stop = threading.Event()
        self._parent = os.getppid()
        self._grandparent = parent_of(self._parent)
        if watch_parent:
            ask_for_sigterm_when_parent_dies()
            self._thread = threading.Thread(target=self._watch_parent, args=(poll_s,), daemon=True)
            self._thread.start()

    def _handler(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.request.requested:
            late = self.first_at is not None and now - self.first_at > self.repeat_window_s
            if signum == signal.SIGINT and late:
                raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
            return
        self.first_at = now
        log.warning("received %s: finishing the current step, then saving and exiting", name)
        self.request.ask(f"received {name}")

    def _watch_parent(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            gone = os.getppid() != self._parent or parent_of(self._parent) != self._grandparent
            if gone and not self.request.requested:
                log.warning(
                    "the launcher (pid %d or its parent %s) is gone: finishing the current step, then "
                    "saving and exiting",
                    self._parent,
                    self._grandparent,
                )
                self.request.ask("the launcher is gone")

    def restore(self) -> None:
        self._stop.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
