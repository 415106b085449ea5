"""The one place that reaches into an engine's optimizer for the non-finite guard.

The guard (``engine.loop.guard``) needs three things DeepSpeed offers no API for: the gradients
this rank holds after the reduce (to test them for NaN/inf with one multi-tensor norm), the torch
optimizer inside (to hand it ``found_inf``, so a bad update is skipped on the device), and a hook
that runs after the reduce and before the update. ``ZeroAdapter`` gets them from DeepSpeed's ZeRO
stage 1/2 optimizer (``DeepSpeedZeroOptimizer``: ``averaged_gradients``, ``bit16_groups``,
``optimizer``), written against DeepSpeed 0.19; ``adapter_for`` refuses an optimizer without
them instead of guessing. ``PlainAdapter`` serves a plain torch optimizer (``LocalEngine``).

Hooks replace the ``step`` attribute of that one optimizer object (never a class), and
``remove()`` puts the originals back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.errors import StackError


class GuardUnavailable(StackError):
    """The engine's optimizer does not expose what the guard needs."""


class OptimizerAdapter:
    def __init__(self, outer: Any, inner: torch.optim.Optimizer):
        self.outer, self.inner = outer, inner
        self._saved: list[tuple[Any, Any]] = []

    def gradients(self) -> list[torch.Tensor]:
        """The gradients this rank's update reads (after any reduce), as one list."""
        raise NotImplementedError

    @property
    def fused(self) -> bool:
        """True when the inner optimizer honours ``found_inf`` on the device (torch's fused kernels)."""
        return bool(self.inner.defaults.get("fused"))

    def hook_step(self, hook: Callable[..., Any]) -> None:
        """Run ``hook(original_step, *args, **kwargs)`` instead of the engine optimizer's step."""
        self._wrap(self.outer, hook)

    def hook_inner_step(self, hook: Callable[..., Any]) -> None:
        """Run ``hook(original_step, *args, **kwargs)`` instead of the torch optimizer's own step."""
        self._wrap(self.inner, hook)

    def set_found_inf(self, flag: torch.Tensor) -> None:
        self.inner.found_inf = flag

    def _wrap(self, obj: Any, hook: Callable[..., Any]) -> None:
        original = obj.step
        self._saved.append((obj, original))
        obj.step = lambda *args, **kwargs: hook(original, *args, **kwargs)

    def remove(self) -> None:
        for obj, original in reversed(self._saved):
            obj.step = original
        self._saved.clear()


class ZeroAdapter(OptimizerAdapter):
    """DeepSpeed ZeRO stage 1/2: this rank's reduced gradient partitions."""

    def gradients(self) -> list[torch.Tensor]:
        out = []
        grads = self.outer.averaged_gradients
        for i in range(len(self.outer.bit16_groups)):
            group = grads.get(i) if isinstance(grads, dict) else None
            flat = getattr(group, "flat_partition", None)
            if flat is not None:
                out.append(flat)
            elif group:
                out.extend(g for g in group if g is not None)
        return out


class PlainAdapter(OptimizerAdapter):
    """A torch optimizer stepped directly: every parameter's ``.grad``."""

    def gradients(self) -> list[torch.Tensor]:
        return [p.grad for g in self.inner.param_groups for p in g["params"] if p.grad is not None]


def adapter_for(optimizer: Any) -> OptimizerAdapter:
    if isinstance(optimizer, torch.optim.Optimizer):
        return PlainAdapter(optimizer, optimizer)
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer) and hasattr(optimizer, "averaged_gradients"):
        return ZeroAdapter(optimizer, inner)
    raise GuardUnavailable(
        f"{type(optimizer).__name__}: not a DeepSpeed ZeRO stage 1/2 optimizer (no averaged_gradients/optimizer); "
        "the non-finite guard supports ZeRO stages 1 and 2"
    )
