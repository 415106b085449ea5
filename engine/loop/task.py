"""The contract between the training loop and a task: what the loop passes in, what a task returns.

The loop (``engine.loop.trainer``) owns the order of a run: DeepSpeed engine, micro-steps and
accumulation, the lr schedule, checkpoints and exact resume, the non-finite guard, signals, the
watchdog and the monitor. A task owns what the run is *about*: the module that DeepSpeed wraps,
its parameter groups, what one micro-step computes, what is evaluated at epoch ends and what a
figure shows. Masked pretraining and classification (fine-tuning, linear probing) are the two
tasks (``engine.tasks``); they import this module, never the other way round.

Everything a task gets from the loop arrives as an argument: the ``TaskContext`` (config, run
plan, ranks, run folder, the checkpoint being resumed) in ``setup``, the engine and a phase timer
in ``forward``. A task sets no attribute on the loop and the loop sets none on the task.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from engine.config import Config, RunPlan
    from engine.loop.dist import DistInfo


@dataclass
class StepOutput:
    """One micro-step's result, as device tensors (nothing is read back here)."""

    loss: torch.Tensor  # [] what backward runs on
    metrics: torch.Tensor  # [K] float32, averaged over steps and ranks at log time (names: Task.metric_names)


@dataclass(frozen=True)
class TaskContext:
    """What a task may look at while it builds (no engine yet)."""

    cfg: Config
    plan: RunPlan  # complete: world size and usable samples are known
    dist: DistInfo
    run_dir: Path
    resume_marker: dict | None  # the completeness marker of the checkpoint being resumed, if any


@dataclass(frozen=True)
class AugmentSpec:
    """The training input pipeline a task asks for (both loaders implement every field)."""

    img_size: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    rand_augment: str = ""  # timm-style "rand-m9-mstd0.5-inc1"; empty = off (MAE pretraining)
    flip_prob: float = 0.5
    labels: bool = False  # the task reads labels (pretraining does not: none are moved to the device)
    label_map: tuple[int, ...] | None = None  # stored label -> what the task reads (a dense classifier head)


class Timer(Protocol):
    """Phase timing the loop lends a task for its own phases (e.g. the teacher's forward)."""

    def start(self, name: str) -> None: ...

    def stop(self, name: str) -> None: ...


class Task(abc.ABC):
    """A task: abstract methods must be implemented; the others have working defaults."""

    name: str = "task"
    metric_names: tuple[str, ...] = ()  # names of StepOutput.metrics entries (metrics.jsonl, TensorBoard)

    def __init__(self) -> None:
        self.ctx: TaskContext | None = None
        self.module: nn.Module | None = None

    # ------------------------------------------------------------------ build
    @abc.abstractmethod
    def setup(self, ctx: TaskContext) -> None:
        """Load weights, teachers and targets and build ``self.module`` (on the CPU, fp32). Sets
        ``self.ctx``; a task whose inputs refine the plan (a teacher's real width) stores the
        refined plan in it, and the loop continues with ``task.plan``."""

    @abc.abstractmethod
    def param_groups(self) -> list[dict]:
        """Optimizer groups: ``params``, ``weight_decay`` and optionally ``lr_scale`` (layer decay)."""

    def make_optimizer(self, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        """Fused AdamW (one kernel per step; honours the guard's ``found_inf``)."""
        o = self.cfg.optim
        return torch.optim.AdamW(groups, lr=lr, betas=(o.betas[0], o.betas[1]), eps=o.eps, fused=True)

    @abc.abstractmethod
    def augment(self) -> AugmentSpec:
        """The training input pipeline."""

    def to_device(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move frozen helpers (teachers) next to the engine; the module itself is DeepSpeed's job."""
        return None  # nothing to do by default

    def compile(self, engine: Any, dtype: torch.dtype) -> tuple[bool, str]:
        """Regional torch.compile; returns (compiled, reason it was not)."""
        return False, "not supported by this task"

    # ------------------------------------------------------------------ step
    @abc.abstractmethod
    def forward(self, engine: Any, batch: Any, timer: Timer) -> StepOutput:
        """One micro-step's forward: loss and metrics as device tensors, no host syncs."""

    # ------------------------------------------------------------------ checkpoints
    def reference(self) -> dict:
        """What the checkpoint must remember about external inputs (teacher path + SHA-256)."""
        return {}

    def check_resume(self, marker: dict) -> None:
        """Refuse a resume whose external inputs changed (called before anything heavy is built)."""
        return None  # nothing to do by default

    def state_dict(self) -> dict:
        """Per-rank task state for exact resume (e.g. the mask generator)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s output (same rank, same world size)."""
        return None  # nothing to do by default

    # ------------------------------------------------------------------ epoch ends and the end
    def on_epoch_end(self, engine: Any, epoch: int) -> dict | None:
        """Evaluation at the end of an epoch (collective: every rank calls it); metrics or None."""
        return None

    def figure(self, engine: Any, path: Path) -> bool:
        """Rank 0 only, no collectives. Returns True when a figure was written."""
        return False

    def finish(self, engine: Any, result: dict) -> dict:
        """Called on every rank after the last step (not after a preemption) with ``step`` and
        ``epoch`` in ``result``; returns it, with ``eval`` (a final evaluation) when there is one."""
        return result

    @property
    def cfg(self) -> Config:
        if self.ctx is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        return self.ctx.cfg

    @property
    def plan(self) -> RunPlan:
        if self.ctx is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        return self.ctx.plan
