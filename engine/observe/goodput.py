"""The goodput account of a run: where every second of every attempt went.

Each start of a run (an *attempt*) is one record in ``RUN_DIR/goodput.json``, written by rank 0 at
every metrics line, every save and at the end, so a process killed without warning still leaves its
account up to its last write. Wall time of an attempt, from its launch to its last write, is split
into the categories of Google's ml-goodput-measurement, in this stack's terms:

* ``startup``: launch to the first step: the launcher and the pre-launch check, imports, the
  process group, the data checks and plan, the model and DeepSpeed's engine, loading a checkpoint.
* ``warmup``: the first step's time beyond a steady step (torch.compile, the first DALI batches,
  allocator growth).
* ``productive``: the steps, as the training thread spends them.
* ``data_wait``: the training thread waiting for the next batch.
* ``checkpoint``: saves holding the training thread (with asynchronous saves, the copy to host memory
  and any wait for a write still in flight).
* ``evaluation``: evaluations, reconstruction figures.
* ``lost_progress``: steps trained and then redone: the steps after the checkpoint a restart resumed
  from (taken from the attempt's last write and the heartbeats), a rollback's steps, stand-in steps
  undone after a transient stop; counted at the mean productive step time of the attempt that ran them.
* ``other``: the rest (logging, shutdown, anything not measured).

Goodput is ``productive / total``. Time between attempts (a scheduler's queue, a relaunch's wait) is
reported beside the total, not in it: it depends on the cluster, not on the run.

The launch time comes from ``DEEPMIM_LAUNCHED_AT`` (set by ``launchers/pretrain.sh`` before its checks),
else from the start of the DeepSpeed launcher process above this rank, else from this process's start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE = "goodput.json"
CATEGORIES = ("startup", "warmup", "productive", "data_wait", "checkpoint", "evaluation", "lost_progress", "other")
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------- launch time
def process_start(pid: int | str = "self") -> float | None:
    """Epoch seconds at which process ``pid`` started (Linux ``/proc``), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 (starttime), counted after the command name
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def _parent(pid: int | str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launch_time() -> tuple[float, str]:
    """(epoch seconds, how it is known) of this attempt's launch."""
    given = os.environ.get("DEEPMIM_LAUNCHED_AT", "")
    with contextlib.suppress(ValueError):
        if given:
            return float(given.replace(",", ".")), "launcher script"  # (a locale may write a comma)
    earliest, source = process_start(), "process start"
    pid: int | None = _parent("self")
    for _ in range(3):  # the node launcher and DeepSpeed's runner above a rank
        if not pid or pid <= 1 or "deepspeed" not in _cmdline(pid):
            break
        started = process_start(pid)
        if started is not None:
            earliest, source = started, "deepspeed launcher start"
        pid = _parent(pid)
    return (earliest if earliest is not None else time.time()), source


class StartupClock:
    """Named marks from launch to the first step, for the start-up line and the account."""

    def __init__(self, origin: float | None = None) -> None:
        if origin is None:
            self.origin, self.origin_source = launch_time()
        else:
            self.origin, self.origin_source = origin, "trainer created"
        self.marks: list[tuple[str, float]] = []

    def mark(self, name: str, at: float | None = None) -> None:
        """``name`` is what ran since the previous mark (or the launch), ending now or at ``at``."""
        self.marks.append((name, time.time() if at is None else at))

    def parts(self) -> list[tuple[str, float]]:
        """(what, seconds) between consecutive marks, starting at the launch."""
        out, prev = [], self.origin
        for name, t in self.marks:
            out.append((name, max(0.0, t - prev)))
            prev = t
        return out


STARTUP = StartupClock()  # the entry point's (engine.cli), from this attempt's launch


# ---------------------------------------------------------------------------------- the account
class GoodputAccount:
    """Rank 0's record of this attempt, appended to the run's earlier ones (see the module docstring).

    The training thread pays a few float additions per step; the file is written at the log interval.
    """

    STEADY_WINDOW = 256  # recent step times kept for the steady step time (warm-up = first - steady)

    def __init__(self, run_dir: Path, writes: bool, clock: StartupClock):
        self.path = Path(run_dir) / FILE
        self.writes = writes
        self.clock = clock
        self.earlier: list[dict] = self._read() if writes else []
        # A killed attempt's furthest step, from its ranks' last heartbeats: read now, before this
        # attempt's watchdog writes its own beats over them.
        self._earlier_reached = self._reached_by_heartbeats(Path(run_dir) / "heartbeat") if self.earlier else 0
        self.attempt: dict[str, Any] = {
            "launched_at": clock.origin,
            "launch_known_from": clock.origin_source,
            "loop_started_at": None,
            "last_write_at": None,
            "outcome": "running",  # running (a process that never wrote its end: killed) | done | ...
            "step_from": None,
            "step_to": None,
            "startup_parts": {},
            "seconds": dict.fromkeys(CATEGORIES, 0.0),
            "steps_redone": 0,
        }
        self._in_loop = 0.0  # loop time spent in categories other than productive
        self._loop_t0 = 0.0
        self._last_boundary = 0.0
        self._nonproductive_at_boundary = 0.0
        self._first_step_s: float | None = None
        self._steady: list[float] = []

    def _read(self) -> list[dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as err:  # a damaged account is restarted, never a reason to stop
            log.warning("%s is unreadable (%s); the goodput account starts again from this attempt", self.path, err)
            return []
        attempts = data.get("attempts", []) if isinstance(data, dict) else []
        return [a for a in attempts if isinstance(a, dict) and "seconds" in a]

    # ------------------------------------------------------------------ start-up and restarts
    def loop_started(self, step: int) -> str:
        """The first step is about to run from ``step``: closes start-up; returns the start-up line."""
        now = time.time()
        a = self.attempt
        a["loop_started_at"], a["step_from"], a["step_to"] = now, step, step
        parts = self.clock.parts()
        a["startup_parts"] = {name: round(s, 3) for name, s in parts}
        a["seconds"]["startup"] = max(0.0, now - self.clock.origin)
        if self.earlier:
            self._count_redone(step)
        self._loop_t0 = self._last_boundary = time.perf_counter()
        detail = ", ".join(f"{name} {s:.1f}" for name, s in parts if s >= 0.05)
        return f"start-up {a['seconds']['startup']:.1f} s from launch to the first step ({detail})"

    def _reached_by_heartbeats(self, heartbeat_dir: Path) -> int:
        prev = self.earlier[-1]
        reached = 0
        if prev.get("outcome") == "running":  # killed: its ranks' last beats
            for hb in heartbeat_dir.glob("rank*.json"):
                with contextlib.suppress(OSError, ValueError, TypeError):
                    beat = json.loads(hb.read_text())
                    if float(beat.get("wall", 0)) >= (prev.get("loop_started_at") or 0):
                        reached = max(reached, int(beat.get("step", 0)))
        return reached

    def _count_redone(self, resumed_at: int) -> None:
        prev = self.earlier[-1]
        reached = max(prev.get("step_to") or 0, self._earlier_reached)
        self.lost_steps(reached - resumed_at, prev)

    def lost_steps(self, steps: int, attempt: dict | None = None) -> None:
        """``steps`` already trained are trained again: their productive time becomes lost progress."""
        if steps <= 0:
            return
        a = attempt if attempt is not None else self.attempt
        done = max(1, (a.get("step_to") or 0) - (a.get("step_from") or 0))
        per_step = a["seconds"]["productive"] / done if attempt is not None else self._mean_step()
        self.attempt["steps_redone"] += steps
        self.attempt["seconds"]["lost_progress"] += steps * per_step

    def _mean_step(self) -> float:
        return statistics.median(self._steady) if self._steady else (self._first_step_s or 0.0)

    # ------------------------------------------------------------------ the loop
    def add(self, category: str, seconds: float) -> None:
        self.attempt["seconds"][category] += seconds
        if self._loop_t0:
            self._in_loop += seconds

    def step_done(self, step: int) -> None:
        """At each optimizer-step boundary (a few float operations)."""
        now = time.perf_counter()
        took = (now - self._last_boundary) - (self._in_loop - self._nonproductive_at_boundary)
        self._last_boundary, self._nonproductive_at_boundary = now, self._in_loop
        if self._first_step_s is None:
            self._first_step_s = took
        else:
            self._steady.append(took)
            if len(self._steady) > self.STEADY_WINDOW:
                del self._steady[: self.STEADY_WINDOW // 2]
        self.attempt["step_to"] = step

    def _close_loop_time(self) -> None:
        """Productive and warm-up seconds so far, from the loop's own time."""
        if not self._loop_t0:
            return
        s = self.attempt["seconds"]
        loop = time.perf_counter() - self._loop_t0
        if self._first_step_s is not None and self._steady:
            s["warmup"] = max(0.0, self._first_step_s - statistics.median(self._steady))
        s["productive"] = max(0.0, loop - self._in_loop - s["warmup"])

    # ------------------------------------------------------------------ the file
    def write(self, outcome: str | None = None) -> None:
        if not self.writes:
            return
        self._close_loop_time()
        a = self.attempt
        if outcome is not None:
            a["outcome"] = outcome
        a["last_write_at"] = now = time.time()
        s = a["seconds"]
        wall = max(0.0, now - a["launched_at"])
        accounted = sum(v for k, v in s.items() if k not in ("other", "lost_progress"))
        s["other"] = max(0.0, wall - accounted)
        doc = {
            "format_version": FORMAT_VERSION,
            "attempts": [*self.earlier, a],
            "summary": summarize([*self.earlier, a]),
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(_rounded(doc), indent=1))
            os.replace(tmp, self.path)
        except OSError as err:  # a full disk shows elsewhere; the account is never why a run stops
            tmp.unlink(missing_ok=True)
            log.debug("goodput account not written: %s", err)

    def end_line(self) -> str:
        return line(summarize([*self.earlier, self.attempt]))


def _rounded(obj: Any) -> Any:
    # Microseconds: coarser rounding made the file's sums and ratios disagree by more than 0.1% on short
    # attempts (a 0.09 s productive total came out 1e-4 off at 4 decimals)
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def summarize(attempts: list[dict]) -> dict:
    """Seconds per category over all attempts (lost progress moved out of productive), goodput, and
    the time between attempts (not in the total)."""
    total = dict.fromkeys(CATEGORIES, 0.0)
    for a in attempts:
        for k in CATEGORIES:
            total[k] += float(a["seconds"].get(k, 0.0))
    total["productive"] = max(0.0, total["productive"] - total["lost_progress"])
    wall = sum(total.values())
    between = 0.0
    for prev, nxt in zip(attempts, attempts[1:]):
        if prev.get("last_write_at") and nxt.get("launched_at"):
            between += max(0.0, nxt["launched_at"] - prev["last_write_at"])
    return {
        "attempts": len(attempts),
        "total_s": wall,
        "seconds": total,
        "shares": {k: (v / wall if wall else 0.0) for k, v in total.items()},
        "goodput": total["productive"] / wall if wall else 0.0,
        "steps_redone": sum(int(a.get("steps_redone", 0)) for a in attempts),
        "between_attempts_s": between,
    }


def line(summary: dict) -> str:
    """One line: goodput and where the rest went."""
    shares = summary["shares"]
    rest = ", ".join(
        f"{k.replace('_', ' ')} {100 * v:.1f}%" for k, v in shares.items() if k != "productive" and v >= 0.0005
    )
    return (
        f"goodput {100 * summary['goodput']:.1f}% of {summary['total_s']:.0f} s over {summary['attempts']} "
        f"attempt(s) ({rest}; {summary['steps_redone']} step(s) redone)"
    )
