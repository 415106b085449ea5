"""Deterministic reading of a shard folder: every sample once, in manifest order, center-cropped.

For evaluation (feature extraction, probes) and figures, where augmentation must not vary. Reads
samples by tar offset through the manifest, like the loaders.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.loaders.base import IMAGENET_MEAN, IMAGENET_STD
from data_pipeline.loaders.source import open_table


def iter_raw(shards: str, remote: RemoteSpec | None = None) -> Iterator[tuple[str, int, bytes]]:
    """Yields (shard/key, label, JPEG bytes) for every sample, in manifest order (``remote``: how to reach
    shards in object storage: the run's own data settings)."""
    table = open_table(shards, remote)
    try:
        for i in range(len(table)):
            yield table.key(i), int(table.label[i]), table.read(i)
    finally:
        table.close()


def center_crop(data: bytes, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """JPEG bytes -> [3, size, size] float32, ImageNet-normalized: resize the short side to
    size / crop_fraction (bicubic) and take the central size x size crop (the usual eval transform)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    t = TF.pil_to_tensor(img)
    t = TF.resize(t, [round(size / crop_fraction)], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    t = TF.center_crop(t, [size, size])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (t.float() / 255.0 - mean) / std


def load_batches(
    shards: str, size: int, batch: int, limit: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Center-cropped batches (img [B, 3, size, size], label [B], keys) over the whole folder."""
    imgs, labels, keys = [], [], []
    for n, (key, label, data) in enumerate(iter_raw(shards)):
        if limit and n >= limit:
            break
        imgs.append(center_crop(data, size))
        labels.append(label)
        keys.append(key)
        if len(imgs) == batch:
            yield torch.stack(imgs), torch.tensor(labels), keys
            imgs, labels, keys = [], [], []
    if imgs:
        yield torch.stack(imgs), torch.tensor(labels), keys
