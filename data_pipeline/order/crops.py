"""How each sample is cropped: pure functions of (seed, epoch, row) and the stored image size.

The random-resized crop (torchvision's algorithm: up to ten draws of area and aspect, then the
central crop at the nearest allowed aspect) and the flip of a sample depend on (seed, epoch, row) and
the image's stored size only, so both loaders crop a sample alike and a restored position reproduces
exactly the remaining batches. Two versions of the random source, recorded with every run's loader
state so that a run resumes with the crops it started with, bit for bit:

* version 2 (``crop_boxes``, every new run): a counter-based hash (SplitMix64's finalizer) of (seed,
  epoch, row, draw) gives each draw, so a whole batch is one vectorized call: about a microsecond per
  sample instead of a generator built per sample;
* version 1 (``crop_params``): a NumPy PCG64 generator seeded per sample (about 16 us each), what runs
  written before version 2 resume with.
"""

from __future__ import annotations

import math

import numpy as np

CROP_VERSION = 2  # what new runs use; checkpoints record theirs (the loader state's "crops")
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijection of uint64 whose outputs pass BigCrush as a counter's hash."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _keys(seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        base = _mix(_mix(np.asarray(seed, dtype=np.uint64) ^ np.uint64(0xC809)) + np.asarray(epoch, dtype=np.uint64))
        return _mix(base + np.asarray(rows, dtype=np.uint64) * _GOLDEN)


def _uniform(keys: np.ndarray, draws: int) -> np.ndarray:
    """Draws 0..draws-1 of every key at once: [draws, N] uniform in [0, 1) with 53 random bits each."""
    with np.errstate(over="ignore"):
        counters = (np.arange(1, draws + 1, dtype=np.uint64) * _GOLDEN)[:, None]
        bits = _mix(keys[None, :] + counters)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def crop_boxes(
    seed: int,
    epoch: int,
    rows: np.ndarray,
    widths: np.ndarray,
    heights: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_prob: float = 0.5,
) -> np.ndarray:
    """Crop boxes and flips of a batch (version 2): rows, widths, heights [N] -> [N, 5] float64 of
    (x, y, w, h) as fractions of each image, and 1.0 to mirror. Every draw is a hash of (seed, epoch,
    row, draw): the same rows give the same boxes whatever the batch they come in."""
    rows = np.asarray(rows, dtype=np.int64)
    width = np.asarray(widths, dtype=np.float64)
    height = np.asarray(heights, dtype=np.float64)
    n = len(rows)
    keys = _keys(seed, epoch, rows)
    area = width * height
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    tries = 10
    u = _uniform(keys, 2 * tries + 3)  # [23, N]: area and aspect of each try, x, y, flip
    target = area * (scale[0] + (scale[1] - scale[0]) * u[0 : 2 * tries : 2])
    aspect = np.exp(lo + (hi - lo) * u[1 : 2 * tries : 2])
    w = np.round(np.sqrt(target * aspect))  # round half to even, like Python's round in torchvision
    h = np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(fits, axis=0)
    found = fits[first, np.arange(n)]
    w, h = w[first, np.arange(n)], h[first, np.arange(n)]
    x = np.floor(u[2 * tries] * (width - w + 1))
    y = np.floor(u[2 * tries + 1] * (height - h + 1))
    if not found.all():  # the central crop at the nearest allowed aspect
        miss = ~found
        in_ratio = width[miss] / height[miss]
        cw = np.where(
            in_ratio < ratio[0],
            width[miss],
            np.where(in_ratio > ratio[1], np.round(height[miss] * ratio[1]), width[miss]),
        )
        ch = np.where(in_ratio < ratio[0], np.round(width[miss] / ratio[0]), height[miss])
        w[miss], h[miss] = cw, ch
        x[miss], y[miss] = (width[miss] - cw) // 2, (height[miss] - ch) // 2
    flip = (u[2 * tries + 2] < flip_prob).astype(np.float64)
    return np.stack([x / width, y / height, w / width, h / height, flip], axis=1)


def crop_batch(version: int, seed: int, epoch: int, rows, widths, heights, scale, ratio, flip_prob) -> np.ndarray:
    """[N, 5] crop boxes and flips of a batch with the run's crop function (``version`` 1 or 2)."""
    if version == 2:
        return crop_boxes(seed, epoch, rows, widths, heights, scale, ratio, flip_prob)
    if version != 1:
        raise ValueError(f"crop function version {version}: known are 1 and 2")
    out = [
        crop_params(seed, epoch, int(r), int(w), int(h), scale, ratio, flip_prob)
        for r, w, h in zip(rows, widths, heights)
    ]
    return np.asarray(out, dtype=np.float64).reshape(len(out), 5)


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
