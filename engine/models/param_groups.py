"""Optimizer parameter groups: which parameters get weight decay, and at what lr scale.

Pretraining (MAE's rule): decay on matrix weights only; none on biases, normalization weights,
tokens (cls, mask) and position embeddings, decided by the owning module's type and the attribute
name, so that stacked decoder parameters (whose norm weights are 2-D [T, E]) are classified like
their per-decoder twins. Fine-tuning adds layer-wise lr decay through timm (engine.models.classifier).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.models.decoders import StackedLayerNorm

_NORM_TYPES = (nn.LayerNorm, StackedLayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)
_NO_DECAY_NAMES = ("bias", "cls_token", "mask_token", "pos_embed")


def uses_weight_decay(module: nn.Module, attr: str) -> bool:
    return not (isinstance(module, _NORM_TYPES) or attr in _NO_DECAY_NAMES)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
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
