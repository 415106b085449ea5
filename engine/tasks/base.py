"""What the training loop needs from a task, and nothing more.

The loop (``engine.loop.trainer``) owns the order of a run: DeepSpeed engine, micro-steps and
accumulation, the lr schedule, checkpoints and exact resume, the non-finite guard, signals, the
watchdog and the monitor. A task owns what the run is *about*: the module that DeepSpeed wraps,
its parameter groups, what one micro-step computes, what is evaluated at epoch ends and what a
figure shows. Pretraining (masks, targets, teachers, decoders) and fine-tuning (classifier head,
mixup, top-1) are two tasks driven by the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.config import Config
from engine.loop.dist import DistInfo
from engine.models.flops import FlopCount


@dataclass
class StepOutput:
    """One micro-step's result, as device tensors (nothing is read back here)."""

    loss: torch.Tensor  # [] what backward runs on
    metrics: torch.Tensor  # [K] float32, averaged over steps and ranks at log time (names: Task.metric_names)


@dataclass
class TaskContext:
    """What a task may look at while it builds (no engine yet)."""

    cfg: Config
    dist: DistInfo
    run_dir: Path
    resume_marker: dict | None  # the completeness marker of the checkpoint being resumed, if any


@dataclass
class AugmentSpec:
    """The training input pipeline a task asks for (both loaders implement every field)."""

    img_size: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    rand_augment: str = ""  # timm-style "rand-m9-mstd0.5-inc1"; empty = off (MAE pretraining)
    flip_prob: float = 0.5


class Task:
    """Base class with the defaults; subclasses override what differs."""

    name = "task"
    metric_names: list[str] = []  # names of StepOutput.metrics entries, for metrics.jsonl and TensorBoard

    def setup(self, ctx: TaskContext) -> None:
        """Load weights, teachers and targets and build ``self.module`` (on the CPU, fp32)."""
        raise NotImplementedError

    module: nn.Module

    def param_groups(self) -> list[dict]:
        """Optimizer groups: ``params``, ``weight_decay`` and optionally ``lr_scale`` (layer decay)."""
        raise NotImplementedError

    def make_optimizer(self, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        """Fused AdamW (one kernel per step; honours the guard's ``found_inf``)."""
        o = self.cfg.optim
        return torch.optim.AdamW(groups, lr=lr, betas=(o.betas[0], o.betas[1]), eps=o.eps, fused=True)

    def augment(self) -> AugmentSpec:
        raise NotImplementedError

    def to_device(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move frozen helpers (teachers) next to the engine; the module itself is DeepSpeed's job."""

    def compile(self, engine, dtype: torch.dtype) -> tuple[bool, str]:
        """Regional torch.compile; returns (compiled, reason it was not)."""
        return False, "not supported by this task"

    def flops(self) -> FlopCount | None:
        return None

    def forward(self, engine, batch) -> StepOutput:
        raise NotImplementedError

    def reference(self) -> dict:
        """What the checkpoint must remember about external inputs (teacher path + SHA-256)."""
        return {}

    def check_resume(self, marker: dict) -> None:
        """Refuse a resume whose external inputs changed (called before anything heavy is built)."""

    def state_dict(self) -> dict:
        """Per-rank task state for exact resume (e.g. the mask generator)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def on_epoch_end(self, engine, epoch: int) -> dict | None:
        """Evaluation at the end of an epoch (collective: every rank calls it); metrics or None."""
        return None

    def figure(self, engine, path: Path) -> bool:
        """Rank 0 only, no collectives. Returns True when a figure was written."""
        return False

    def finish(self, engine, result: dict) -> dict:
        """Called on every rank after the last step (not after a preemption) with ``step`` and
        ``epoch`` in ``result``; returns it, with ``eval`` (a final evaluation) when there is one."""
        return result

    @property
    def cfg(self) -> Config:
        return self.ctx.cfg
