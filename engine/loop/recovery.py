"""Acting on the non-finite guard's lagged flags: what the loop does when a step went wrong.

The guard (``engine.loop.guard``) all-reduces, with each step, whether the loss or a gradient was
non-finite, whether a stop was requested and whether a rank trained on stand-in data; the loop reads
those flags ``lag`` steps later without waiting for the device. ``Recovery`` owns what follows:

* a non-finite step is skipped (the guard already did) and logged; after ``fault.max_bad_steps`` in a
  row the weights and optimizer state of the newest complete checkpoint are loaded back (a rollback)
  and the data goes on past the offending batches; after ``fault.max_rollbacks`` the run stops;
* a stop request becomes a preemption at the step every rank agrees on;
* stand-in steps (a rank that could not read its shard in time) are undone: the state before the first
  of them is kept for the few steps the lag hides (``snapshot``), and restored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from engine.config.schema import FaultConfig
from engine.errors import NonFiniteError, TransientError
from engine.loop.guard import NonFiniteGuard
from engine.loop.rng import rng_state, set_rng_state
from engine.run_folder import checkpoints as ckpt

log = logging.getLogger(__name__)


class VoidSteps(Exception):
    """Raised inside the loop when steps from guard step ``first`` on were stand-ins on some rank."""

    def __init__(self, first: int):
        super().__init__(first)
        self.first = first


class Recovery:
    def __init__(self, cfg: FaultConfig, guard: NonFiniteGuard):
        self.cfg, self.guard = cfg, guard
        self.rollbacks = 0  # in this process (checkpointed with the run's progress)
        self.stale_flags_through = 0  # guard steps whose flags predate the last rollback
        self.flags_read = 0  # guard steps whose flags the loop has acted on
        # per guard step g: the state before it (step count, loader position, RNG, task state), for the
        # few steps whose flags the lag has not shown yet: a transient stop sets every rank back to one
        self.snapshots: dict[int, tuple] = {}

    # ------------------------------------------------------------------ the flags
    def react(self) -> tuple[str, int] | None:
        """The action the flags of ``lag`` steps ago call for (identical on every rank):
        ("rollback", consecutive bad steps), ("preempt", 0) or None; raises ``VoidSteps``."""
        flags = self.guard.latest()
        if flags is None or flags.step <= self.stale_flags_through:
            return None  # (steps already answered by a rollback; a stop request is repeated by later steps)
        self.flags_read = max(self.flags_read, flags.step)
        if flags.void:
            raise VoidSteps(flags.step)
        if flags.bad:
            log.warning(
                "step %d: non-finite loss or gradient; update skipped (%d skipped so far, %d in a row)",
                flags.step,
                flags.skipped_total,
                flags.consecutive_bad,
            )
        if flags.consecutive_bad >= self.cfg.max_bad_steps:
            return "rollback", flags.consecutive_bad
        if flags.stop:
            return "preempt", 0
        return None

    def first_void(self) -> int | None:
        """Before a save: the first guard step not yet acted on whose flags say some rank stood in
        empty data (read now, waiting for the device: saves are rare)."""
        start = max(self.flags_read, self.stale_flags_through) + 1
        for g in range(start, self.guard.steps + 1):
            flags = self.guard.flags_at(g)
            if flags is not None and flags.void:
                return g
        return None

    # ------------------------------------------------------------------ rollbacks
    def rollback(self, bad: int, step: int, engine: Any, ckpt_dir: Path, world_size: int) -> tuple[Path, int]:
        """Load the newest complete checkpoint's weights and optimizer state; returns it and its step."""
        path = ckpt.newest_complete(ckpt_dir)
        if path is None:
            raise NonFiniteError(f"{bad} consecutive non-finite steps at step {step} and no checkpoint to roll back to")
        if ckpt.read_marker(path)["world_size"] != world_size:
            raise NonFiniteError(
                f"{bad} consecutive non-finite steps; the newest checkpoint {path} is from another world size and "
                "cannot be rolled back to in this process"
            )
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise NonFiniteError(
                f"{bad} consecutive non-finite steps at step {step} after {self.rollbacks} rollbacks "
                f"(fault.max_rollbacks); stopping instead of training on"
            )
        _, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        self.rollbacks += 1
        self.guard.reset_consecutive()
        # Flags of the steps run since the ones that triggered this (the lag) still count the bad
        # streak from before: acting on them would roll back again at once.
        self.stale_flags_through = self.guard.steps
        log.warning(
            "rolled back to %s after %d consecutive non-finite steps (rollback %d); data continues past the "
            "offending batches",
            path,
            bad,
            self.rollbacks,
        )
        return path, client["train"]["step"]

    # ------------------------------------------------------------------ stand-in steps
    def snapshot(self, step: int, loader: Any, task: Any) -> None:
        """The state before the next step (guard step ``steps + 1``): a few dozen microseconds of host
        copies per step, no device sync. Kept for the steps whose flags the lag has not shown yet."""
        g = self.guard.steps + 1
        self.snapshots[g] = (step, loader.snapshot(), rng_state(), task.state_dict())
        for old in [k for k in self.snapshots if k < g - self.guard.RING]:
            del self.snapshots[old]

    def undo_void(self, first: int, loader: Any, task: Any) -> tuple[int, int]:
        """Set the loader positions, RNG and task state back to the state before guard step ``first``
        (the weights are still that state's: every rank skipped those updates); returns (the step of
        that state, how many steps are undone)."""
        snap = self.snapshots.get(first)
        if snap is None:
            raise TransientError(f"stood in empty data since guard step {first}, whose state is no longer kept")
        voided = self.guard.steps - (first - 1)
        self.guard.skipped.sub_(voided)  # stand-ins, not non-finite steps
        step, loader_state, rng, task_state = snap
        loader.restore_snapshot(loader_state)
        set_rng_state(rng)
        task.load_state_dict(task_state)
        self.flags_read = self.stale_flags_through = self.guard.steps
        self.guard.void = False
        return step, voided
