"""Skip optimizer updates with a non-finite loss or gradient, on the device, without host syncs.

DeepSpeed's own bf16 overflow check reads a flag back to the host every step (``.item()``) after
testing every gradient tensor one by one; with ``check_grad_overflow`` off it does not look at
all. This guard replaces it:

* each micro-step's loss adds ``not isfinite(loss)`` to a device flag;
* before the ZeRO optimizer steps, one multi-tensor norm tests every gradient of this rank's
  partitions (all parameter groups), and the flag is max-all-reduced over the data-parallel
  group (an enqueued collective, not a host sync) so every rank skips or applies together;
* the flag is handed to torch's fused AdamW as ``found_inf``: the kernel leaves weights,
  moments and step counts untouched when it is set. Skips are counted on the device;
* counters are copied to pinned host memory behind a CUDA event and read when ready, one step
  late, so the trainer can react (roll back after K bad steps) without ever waiting.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class GuardUnavailable(RuntimeError):
    """The DeepSpeed optimizer does not expose what the guard needs."""


class NonFiniteGuard:
    def __init__(self, zero_optimizer, device: torch.device, group=None):
        inner = getattr(zero_optimizer, "optimizer", None)
        if inner is None or not hasattr(zero_optimizer, "averaged_gradients"):
            raise GuardUnavailable(f"{type(zero_optimizer).__name__} has no averaged_gradients/optimizer")
        if not inner.defaults.get("fused"):
            raise GuardUnavailable("the inner optimizer must be a fused torch AdamW (found_inf support)")
        self.zero = zero_optimizer
        self.inner = inner
        self.group = group
        self.device = device
        self.found = torch.zeros((), device=device)
        self.loss_bad = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        self.consecutive = torch.zeros((), device=device)
        self.inject_grad = False  # tests: poison one gradient before the check
        self._orig_step = zero_optimizer.step
        zero_optimizer.step = self._step
        cuda = device.type == "cuda"
        self._host = torch.zeros(2, pin_memory=cuda)
        self._event = torch.cuda.Event() if cuda else None
        self._ready = False

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Called every micro-step with the (detached) loss."""
        torch.maximum(self.loss_bad, (~torch.isfinite(loss.detach())).float(), out=self.loss_bad)

    def _grads(self) -> list[torch.Tensor]:
        out = []
        for i in range(len(self.zero.bit16_groups)):
            group = self.zero.averaged_gradients.get(i) if isinstance(self.zero.averaged_gradients, dict) else None
            flat = getattr(group, "flat_partition", None)
            if flat is not None:
                out.append(flat)
            elif group:
                out.extend(g for g in group if g is not None)
        return out

    def _step(self, *args, **kwargs):
        grads = self._grads()
        if self.inject_grad and grads:
            grads[0].view(-1)[0] = float("nan")
            self.inject_grad = False
        self.found.copy_(self.loss_bad)
        if grads:
            # One multi-tensor norm kernel over every gradient (bf16 or fp32): NaN/inf show in the norms.
            norms = torch.stack(torch._foreach_norm(grads)).float()
            torch.maximum(self.found, (~torch.isfinite(norms).all()).float(), out=self.found)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.found, op=torch.distributed.ReduceOp.MAX, group=self.group)
        self.inner.found_inf = self.found
        try:
            return self._orig_step(*args, **kwargs)
        finally:
            self.skipped.add_(self.found)
            self.consecutive.add_(1).mul_(self.found)
            self.loss_bad.zero_()
            self._publish()

    def _publish(self) -> None:
        self._host.copy_(torch.stack([self.skipped, self.consecutive]), non_blocking=self._event is not None)
        if self._event is not None:
            self._event.record()
        self._ready = True

    def poll(self) -> tuple[int, int] | None:
        """(skipped total, consecutive bad) as of the last finished step, or None if not ready yet.
        Never blocks: on GPU it answers once the copy behind the event has landed."""
        if not self._ready or (self._event is not None and not self._event.query()):
            return None
        skipped, consecutive = self._host.tolist()
        return int(skipped), int(consecutive)

    def reset_consecutive(self) -> None:
        self.consecutive.zero_()
        self._publish()

    def state_dict(self) -> dict:
        return {"skipped": float(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped.fill_(state.get("skipped", 0.0))
        self.consecutive.zero_()
