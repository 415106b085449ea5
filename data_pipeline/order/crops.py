"""How each sample is cropped: pure functions of (seed, epoch, row) and the stored image size.

The random-resized crop and the flip of a sample are drawn from a generator seeded by (seed,
epoch, row), so both loaders crop the same sample the same way, and a restored position
reproduces exactly the remaining batches.
"""

from __future__ import annotations

import math

import numpy as np


def crop_params(
    seed: int,
    epoch: int,
    row: int,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_prob: float = 0.5,
) -> tuple[float, float, float, float, bool]:
    """Random-resized-crop box (torchvision's algorithm) and flip of one sample, from its stored
    size: (x, y, w, h) as fractions of the image, and whether to mirror."""
    gen = np.random.default_rng([seed, epoch, row, 0x5EED])
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target = area * gen.uniform(scale[0], scale[1])
        aspect = math.exp(gen.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            box = (int(gen.integers(0, width - w + 1)), int(gen.integers(0, height - h + 1)), w, h)
            break
    if box is None:  # fallback: the central crop at the nearest allowed aspect
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            h, w = height, round(height * ratio[1])
        else:
            w, h = width, height
        box = ((width - w) // 2, (height - h) // 2, w, h)
    flip = bool(gen.random() < flip_prob)
    x, y, w, h = box
    return x / width, y / height, w / width, h / height, flip


def pixel_box(frac: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Fractions of an image -> (left, top, w, h) in pixels of an image of this size (at least 1 px)."""
    x, y, w, h = frac
    left, top = min(width - 1, round(x * width)), min(height - 1, round(y * height))
    return left, top, max(1, min(width - left, round(w * width))), max(1, min(height - top, round(h * height)))
