"""The metrics line of a logged step: the only place the loop reads values back from the device.

``StepLog`` owns what accumulates between two lines (the loss meter, the phase timer, the window's
start); ``line`` averages the loss across ranks, turns phase times into shares of the window, adds
throughput, MFU and memory, records it (metrics.jsonl, TensorBoard) and prints one line.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from engine.observe.telemetry import MetricMeter, PhaseTimer, peak_memory_gb

log = logging.getLogger(__name__)


class StepLog:
    def __init__(self, device: torch.device, global_batch: int, world_size: int):
        self.device = device
        self.global_batch, self.world_size = global_batch, world_size
        self.meter = MetricMeter()
        self.timer = PhaseTimer(device)
        self.window_start, self.window_steps = time.perf_counter(), 0

    def step_done(self) -> None:
        self.window_steps += 1

    def forget_losses(self) -> None:
        """Steps that were undone or rolled back: their losses are not part of any average."""
        self.meter = MetricMeter()

    def line(
        self,
        step: int,
        steps_per_epoch: int,
        stop: int,
        lr: float,
        extra: dict,
        peak: float | None,
        flops_per_image: float,
        metric_names: tuple[str, ...],
    ) -> dict:
        """Record and print the line of ``step``; ``extra`` adds the run's counters, ``metric_names``
        names the task's loss parts (known once the task is set up). Returns the record."""
        seconds = max(time.perf_counter() - self.window_start, 1e-9)
        steps = self.window_steps
        loss, parts = self.meter.mean_across_ranks()
        phases = self.timer.collect()
        rate = steps * self.global_batch / seconds
        share = {k: v / seconds for k, v in phases.items()}  # fraction of wall time per phase
        rec: dict[str, Any] = {
            "step": step,
            "epoch": step / steps_per_epoch,
            "lr": lr,
            "loss": loss,
            **dict(zip(metric_names, parts)),
            "img_per_s": rate,
            "mfu": rate * flops_per_image / self.world_size / peak if peak and flops_per_image else None,
            **{f"time_{k}_s": v / max(steps, 1) for k, v in phases.items()},
            **{f"share_{k}": v for k, v in share.items()},
            "peak_mem_gb": peak_memory_gb(self.device),
            **extra,
        }
        part_txt = " ".join(f"{k.removeprefix('loss_')}={v:.4f}" for k, v in zip(metric_names, parts))
        mfu = f" mfu {rec['mfu']:.1%}" if rec["mfu"] is not None else ""
        teacher = f" teacher {100 * share['teacher']:.0f}%" if "teacher" in share else ""  # runs that have one
        log.info(
            "step %d/%d ep %.2f lr %.3g loss %.4f%s %.1f img/s%s data %.0f%%%s",
            step,
            stop,
            rec["epoch"],
            lr,
            loss,
            f" [{part_txt}]" if part_txt else "",
            rate,
            mfu,
            100 * share.get("data_wait", 0.0),
            teacher,
        )
        self.window_start, self.window_steps = time.perf_counter(), 0
        return rec
