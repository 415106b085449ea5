"""Learning-rate schedule: a pure function of the global optimizer step.

Only the step is checkpointed; the lr at any step can be recomputed, so resuming (on any number
of ranks) lands on exactly the same curve.
"""

from __future__ import annotations

import math


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0, then a half-cycle cosine to ``min_lr`` at ``total_steps``.

    ``step`` is the 0-based index of the update about to be made (MAE's per-iteration rule:
    lr = peak * step / warmup during warm-up).
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
