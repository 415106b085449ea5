"""Fault drills (``debug.*``): NaN losses and gradients at chosen steps, slowed steps, a held-open
save. Tests and recovery rehearsals use them; real runs get ``NO_FAULTS``, whose methods do
nothing, so the training loop carries no drill logic of its own."""

from __future__ import annotations

import time

import torch

from engine.config.schema import DebugConfig


class NoFaults:
    """The injector of a real run: every hook is a no-op."""

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of a micro-step of optimizer step ``step`` (1-based)."""
        return loss

    def poison_gradient(self, step: int) -> bool:
        """Whether the guard should poison a gradient before checking optimizer step ``step``."""
        return False

    def step_done(self, step: int) -> None:
        """After optimizer step ``step``."""

    def before_marker(self) -> None:
        """Between a checkpoint's files and its completeness marker."""


NO_FAULTS = NoFaults()


class FaultDrills(NoFaults):
    def __init__(self, debug: DebugConfig):
        self.nan_loss = set(debug.nan_loss_steps)
        self.nan_grad = set(debug.nan_grad_steps)
        self.step_sleep_s = debug.step_sleep_s
        self.marker_pause_s = debug.pause_before_marker_s

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.nan_loss else loss

    def poison_gradient(self, step: int) -> bool:
        return step in self.nan_grad

    def step_done(self, step: int) -> None:
        # each drill fires once per step number: a rollback that redoes the step trains it normally
        self.nan_loss.discard(step)
        self.nan_grad.discard(step)
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)

    def before_marker(self) -> None:
        if self.marker_pause_s:
            time.sleep(self.marker_pause_s)


def fault_injector(debug: DebugConfig) -> NoFaults:
    drills = debug.nan_loss_steps or debug.nan_grad_steps or debug.step_sleep_s or debug.pause_before_marker_s
    return FaultDrills(debug) if drills else NO_FAULTS
