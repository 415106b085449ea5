"""Per-step fault flags on the device: non-finite updates are skipped, stop requests agreed on,
and the host learns about both without waiting for the GPU.

DeepSpeed's own bf16 overflow check reads a flag back to the host every step (``.item()``) after
testing every gradient tensor one by one (~50 ms and six host syncs per step for ViT-B on an
H100, see bench/results). With ``check_grad_overflow`` off it does not look at all. This guard
replaces it:

* each micro-step's loss adds ``not isfinite(loss)`` to a device flag;
* before the ZeRO optimizer steps (reached through ``engine.loop.zero_adapter``), one
  multi-tensor norm tests every gradient of this rank's
  partitions (all parameter groups) and a local stop request (a signal) is added; the two flags
  are max-all-reduced over the data-parallel group (an enqueued collective, not a host sync), so
  every rank sees the same values at the same step;
* a rank that could not read its data in time (``void``: a condition of the moment outlasted its
  patience, ``engine.loop.transient``) raises a third flag; it also marks the update as skipped, so
  every rank leaves the weights as they were, and the trainer stops all ranks at the same step;
* the non-finite flag is handed to torch's fused AdamW as ``found_inf``: the kernel leaves
  weights, moments and step counts untouched when it is set. Skips are counted on the device;
* after each step the flags and counters are copied to a ring of pinned host buffers behind
  CUDA events. The trainer reads step ``t - lag`` at step ``t``: by then the copy has landed
  (the host runs at most about one step ahead), so reading does not wait, and since the values
  were all-reduced, every rank takes the same decision (roll back, stop) at the same step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.config.schema import GUARD_RING
from engine.loop.signals import StopRequest
from engine.loop.zero_adapter import OptimizerAdapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepFlags:
    step: int  # the optimizer step these flags belong to (1-based: after that update)
    bad: bool  # the update was skipped (non-finite loss or gradient on some rank)
    stop: bool  # some rank asked to stop (preemption signal) at or before this step
    void: bool  # some rank stood in empty data for this step (its update was skipped everywhere)
    skipped_total: int
    consecutive_bad: int


class NonFiniteGuard:
    RING = GUARD_RING

    def __init__(
        self,
        optimizer: OptimizerAdapter,
        device: torch.device,
        stop: StopRequest | None = None,
        group=None,
        lag: int | None = None,
    ):
        self.opt, self.group, self.device = optimizer, group, device
        self.stop = stop or StopRequest()
        # Fused torch optimizers skip a non-finite update on the device (found_inf). Others (timm's
        # LARS for linear probing) are skipped from the host: one flag read per step, a sync that
        # only a probe (a head-only update) pays.
        self.on_device = optimizer.fused
        self._skip_now = False
        if not self.on_device:
            optimizer.hook_inner_step(self._host_skipped_step)
        cuda = device.type == "cuda"
        self.lag = (2 if cuda else 0) if lag is None else lag
        self.flags = torch.zeros(3, device=device)  # [bad, stop, void], all-reduced with MAX
        self.loss_bad = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        self.consecutive = torch.zeros((), device=device)
        self.inject_grad = False  # fault drills: poison one gradient before the check
        self.void = False  # this rank's micro-batches of the step are stand-ins (set by the trainer)
        self.steps = 0
        self._host = [torch.zeros(5, pin_memory=cuda) for _ in range(self.RING)]
        self._events = [torch.cuda.Event() if cuda else None for _ in range(self.RING)]
        optimizer.hook_step(self._step)

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Called every micro-step with the (detached) loss."""
        torch.maximum(self.loss_bad, (~torch.isfinite(loss.detach())).float(), out=self.loss_bad)

    def _step(self, original, *args, **kwargs):
        grads = self.opt.gradients()
        if self.inject_grad and grads:
            grads[0].view(-1)[0] = float("nan")
            self.inject_grad = False
        self.flags[0].copy_(self.loss_bad)
        self.flags[1].fill_(1.0 if self.stop.requested else 0.0)
        self.flags[2].fill_(1.0 if self.void else 0.0)
        if self.void:  # no update from stand-in data, on any rank
            self.flags[0].fill_(1.0)
        if grads:
            # One multi-tensor norm kernel over every gradient (bf16 or fp32): NaN/inf show in the norms.
            norms = torch.stack(torch._foreach_norm(grads)).float()
            torch.maximum(self.flags[0], (~torch.isfinite(norms).all()).float(), out=self.flags[0])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.flags, op=torch.distributed.ReduceOp.MAX, group=self.group)
        if self.on_device:
            self.opt.set_found_inf(self.flags[0])
        else:
            self._skip_now = bool(self.flags[0].item())
        try:
            return original(*args, **kwargs)
        finally:
            self.skipped.add_(self.flags[0])
            self.consecutive.add_(1).mul_(self.flags[0])
            self.loss_bad.zero_()
            self.steps += 1
            self._publish()

    def _host_skipped_step(self, original, *args, **kwargs):
        if self._skip_now:
            return None
        return original(*args, **kwargs)

    def _publish(self) -> None:
        slot = self.steps % self.RING
        vals = torch.stack([self.flags[0], self.flags[1], self.skipped, self.consecutive, self.flags[2]])
        event = self._events[slot]
        self._host[slot].copy_(vals, non_blocking=event is not None)
        if event is not None:
            event.record()

    def flags_at(self, step: int) -> StepFlags | None:
        """Flags of optimizer step ``step`` (None before the first step). The ring holds the last
        ``RING`` steps; callers read ``steps - lag``, whose copy has almost always landed (if not,
        this waits for that one event)."""
        if step < 1 or step > self.steps or self.steps - step >= self.RING:
            return None
        slot = step % self.RING
        if self._events[slot] is not None and not self._events[slot].query():
            self._events[slot].synchronize()
        bad, stop, skipped, consecutive, void = self._host[slot].tolist()
        return StepFlags(step, bad > 0, stop > 0, void > 0, int(skipped), int(consecutive))

    def latest(self) -> StepFlags | None:
        """The flags the trainer acts on now: those of ``lag`` steps ago."""
        return self.flags_at(self.steps - self.lag)

    def host_buffers(self) -> list[torch.Tensor]:
        """The host-side ring the flags are copied to (pinned on CUDA): reading it never waits."""
        return list(self._host)

    def reset_consecutive(self) -> None:
        self.consecutive.zero_()

    def state_dict(self) -> dict:
        return {"skipped": float(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped.fill_(state.get("skipped", 0.0))
        self.consecutive.zero_()

    def close(self) -> None:
        """Put the optimizer's own step methods back."""
        self.opt.remove()
