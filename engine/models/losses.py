"""Reconstruction losses for all taps at once.

Every function takes the stacked predictions of all T decoders and returns a [T] vector of
float32 losses, computed in one pass (one kernel chain, upcasting to float32 inside the
reduction) instead of T separate loss computations. Shapes follow ``engine.models.mim``'s legend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred: [T, N, L, P], target: [T or 1, N, L, P], mask: [N, L] -> [T].

    Mean squared error per patch, averaged over the masked patches of the batch (MAE's loss).
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [T, N, L]
    return (per_patch * mask).sum(dim=(1, 2)) / mask.sum().clamp_min(1.0)


def masked_cosine(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred: [T, N, L, C], target: [T or 1, N, L, C] (patch tokens only; cls excluded) -> [T].

    Per token ``2 - 2 * cos(pred, target)``, averaged over the masked tokens of the whole batch.
    """
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6)  # [T, N, L]
    return ((2.0 - 2.0 * cos) * mask).sum(dim=(1, 2)) / mask.sum().clamp_min(1.0)


def masked_smooth_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred: [T, N, L, C], target: [T or 1, N, L, C] -> [T].

    Smooth-L1 (beta 2) against the target normalized per token (a layer norm without affine, as
    MaskDistill distils features), averaged over channels and the masked tokens of the batch.
    """
    t = F.layer_norm(target.float(), target.shape[-1:], eps=1e-6)
    per_token = F.smooth_l1_loss(pred.float(), t.expand_as(pred), reduction="none", beta=2.0).mean(dim=-1)
    return (per_token * mask).sum(dim=(1, 2)) / mask.sum().clamp_min(1.0)


LOSSES = {"mse": masked_mse, "cosine": masked_cosine, "smooth_l1": masked_smooth_l1}
