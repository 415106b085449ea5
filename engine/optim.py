"""AdamW parameter groups: weight decay on matrix weights only.

No decay on biases, normalization weights, tokens (cls, mask) and position embeddings, decided
by the owning module's type and the attribute name, so that stacked decoder parameters (whose
norm weights are 2-D [T, E]) are classified like their per-decoder twins.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.decoders import StackedLayerNorm

_NORM_TYPES = (nn.LayerNorm, StackedLayerNorm, nn.GroupNorm, nn.BatchNorm2d)
_NO_DECAY_NAMES = ("bias", "cls_token", "mask_token", "pos_embed")


def uses_weight_decay(module: nn.Module, attr: str) -> bool:
    return not (isinstance(module, _NORM_TYPES) or attr in _NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decay and a no-decay group (each with a ``name``)."""
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (decay if uses_weight_decay(module, attr) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: list[float], eps: float
) -> torch.optim.Optimizer:
    # fused (CPU and CUDA): one kernel per step, and it honours ``found_inf`` (engine.guard)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(betas[0], betas[1]), eps=eps, fused=True)
