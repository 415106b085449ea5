"""Stop requests from outside: preemption signals, Ctrl-C, and a launcher that went away.

SIGTERM, SIGUSR1 and SIGINT all mean "finish the current step, save, exit 0": the handler only
sets a flag that the guard all-reduces with the next step's fault flags, so every rank stops at
the same step. A second SIGINT stops at once (KeyboardInterrupt), for the impatient.

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


class StopSignals:
    """Installs the handlers; ``flag_owner.stop_requested`` becomes True on a stop request."""

    def __init__(self, flag_owner, watch_parent: bool = True, poll_s: float = 2.0):
        self.owner = flag_owner
        self.count = 0
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
        if signum == signal.SIGINT and self.owner.stop_requested:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        if not self.owner.stop_requested:
            log.warning("received %s: finishing the current step, then saving and exiting", name)
        self.owner.stop_requested = True

    def _watch_parent(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            gone = os.getppid() != self._parent or parent_of(self._parent) != self._grandparent
            if gone and not self.owner.stop_requested:
                log.warning("the launcher (pid %d or its parent %s) is gone: finishing the current step, then "
                            "saving and exiting", self._parent, self._grandparent)  # fmt: skip
                self.owner.stop_requested = True

    def restore(self) -> None:
        self._stop.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
