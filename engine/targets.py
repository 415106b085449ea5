"""Reconstruction targets, computed without gradients inside the training step.

A target object maps the augmented batch (and the shared mask) to a tensor the decoders are
trained against: [1, N, L, P] when every decoder shares it, [T, N, L, P] when each tap has its own.
"""

from __future__ import annotations

import torch

from engine.model import MaskState, patchify


def normalized_pixel_target(imgs: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """imgs: [N, 3, H, W] -> [N, L, P] float32; per patch (x - mean) / sqrt(var + 1e-6) as in MAE.

    MAE uses the unbiased variance (``Tensor.var``'s default); we keep it to match its numbers.
    """
    target = patchify(imgs.float(), p)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


class PixelTarget:
    """MAE's (normalized) pixel target, shared by every decoder."""

    kind = "pixel"

    def __init__(self, patch_size: int, norm_pix: bool = True):
        self.patch_size = patch_size
        self.norm_pix = norm_pix

    @torch.no_grad()
    def __call__(self, imgs: torch.Tensor, masks: MaskState) -> torch.Tensor:
        return normalized_pixel_target(imgs, self.patch_size, self.norm_pix)[None]
