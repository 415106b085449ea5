"""Which samples each rank reads, in which order, and how each is cropped: pure functions.

An epoch is a seeded permutation of the manifest rows, minus the rows excluded as unreadable.
Each rank reads a contiguous slice of it (the split DALI's readers use) and takes as many whole
optimizer steps as the smallest slice allows; the rest of the epoch (fewer samples than one
global batch plus the world size) is left out, a different few each epoch.

Resuming must never repeat or skip a sample, whatever changed in between: the number of ranks,
the micro-batch, the loader, or the set of excluded samples (a bad JPEG found at run time). So an
epoch is a list of *phases*. A phase records the world size and excluded rows it ran with and how
many samples every rank had taken when it ended (ranks are in lockstep: the same count on every
rank). The next phase's pool is the previous pool minus everything taken and minus newly
excluded rows, split again over the new world. An uninterrupted epoch, or a resume that changed
nothing that matters, is a single phase. The micro-batch never matters: positions are samples.

The random-resized crop and the flip of a sample are drawn from a generator seeded by (seed,
epoch, row) and the stored image size, so both loaders crop the same sample the same way, and a
restored position reproduces exactly the remaining batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of this rank's contiguous slice of ``num_samples``."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass(frozen=True)
class Phase:
    world: int  # ranks that read this phase
    consumed: int  # samples every rank had taken from its slice when the phase ended (or so far)
    excluded: tuple[int, ...] = ()  # manifest rows left out from this phase on (sorted)

    def to_state(self) -> list:
        return [self.world, self.consumed, pack_rows(self.excluded)]

    @staticmethod
    def from_state(s: list) -> Phase:
        return Phase(int(s[0]), int(s[1]), unpack_rows(s[2]))


def pack_rows(rows: tuple[int, ...]) -> list[int] | dict:
    """Sorted row ids for a checkpoint: a list when short, else zlib-compressed differences (a million
    excluded rows of a billion-sample set take a few MB instead of tens)."""
    if len(rows) <= 64:
        return list(rows)
    import base64
    import zlib

    deltas = np.diff(np.asarray(rows, dtype=np.int64), prepend=0).astype("<i8")
    return {"n": len(rows), "zdelta": base64.b64encode(zlib.compress(deltas.tobytes(), 6)).decode()}


def unpack_rows(state: list | dict) -> tuple[int, ...]:
    if isinstance(state, dict):
        import base64
        import zlib

        deltas = np.frombuffer(zlib.decompress(base64.b64decode(state["zdelta"])), dtype="<i8")
        rows = np.cumsum(deltas)
        if len(rows) != state["n"]:
            raise ValueError("corrupt excluded-row record in the loader state")
        return tuple(int(i) for i in rows)
    return tuple(int(i) for i in state)


def _drop(pool: np.ndarray, rows) -> np.ndarray:
    if len(rows) == 0:
        return pool
    return pool[~np.isin(pool, np.asarray(rows, dtype=np.int64))]


def phase_pool(seed: int, epoch: int, n: int, phases: list[Phase]) -> np.ndarray:
    """The samples of the last phase of ``epoch``, in order: the epoch's permutation minus what
    earlier phases took and minus every phase's excluded rows."""
    return pool_after(epoch_permutation(seed, epoch, n), phases)


def pool_after(pool: np.ndarray, phases: list[Phase]) -> np.ndarray:
    """An epoch's sequence of rows minus what the phases before the last took and minus every phase's
    excluded rows (the definition the block order computes without materializing the sequence)."""
    for i, ph in enumerate(phases):
        pool = _drop(pool, ph.excluded)
        if i == len(phases) - 1:
            break
        taken = [pool[lo : lo + ph.consumed] for lo, _ in (rank_range(len(pool), r, ph.world) for r in range(ph.world))]
        pool = _drop(pool, np.concatenate(taken))
    return pool


def steps_in_pool(pool_size: int, world: int, samples_per_rank_step: int) -> int:
    """Whole optimizer steps every rank can take from a pool (the smallest slice decides)."""
    return (pool_size // world) // samples_per_rank_step


class RankStream:
    """This rank's samples for the rest of one phase, from its current position: ``length`` rows,
    produced in chunks so that an order never has to hold a rank's whole share at once."""

    def __init__(self, epoch: int, start: int, length: int):
        self.epoch = epoch
        self.start = start  # samples of the phase already taken by this rank
        self.length = length  # samples still to be read by this rank in this phase

    def chunks(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def batches(self, size: int) -> Iterator[np.ndarray]:
        """The rows in groups of ``size`` (the last partial group is not produced)."""
        held: list[np.ndarray] = []
        have = 0
        left = self.length // size * size
        for chunk in self.chunks():
            chunk = chunk[:left]
            left -= len(chunk)
            held.append(chunk)
            have += len(chunk)
            if have >= size:
                rows = np.concatenate(held)
                whole = len(rows) // size * size
                yield from (rows[k : k + size] for k in range(0, whole, size))
                held, have = [rows[whole:]], len(rows) - whole
            if left == 0:
                return

    @property
    def rows(self) -> np.ndarray:
        """All of the rows at once (tests and small data)."""
        parts = list(self.chunks())
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class ArrayStream(RankStream):
    def __init__(self, epoch: int, start: int, rows: np.ndarray):
        super().__init__(epoch, start, len(rows))
        self._rows = rows

    def chunks(self) -> Iterator[np.ndarray]:
        yield self._rows


def rank_stream(
    seed: int, epoch: int, n: int, phases: list[Phase], rank: int, samples_per_rank_step: int
) -> RankStream:
    pool = phase_pool(seed, epoch, n, phases)
    world = phases[-1].world
    lo, _ = rank_range(len(pool), rank, world)
    take = steps_in_pool(len(pool), world, samples_per_rank_step) * samples_per_rank_step
    start = phases[-1].consumed
    return ArrayStream(epoch, start, pool[lo + start : lo + take])


@dataclass(frozen=True)
class GlobalOrder:
    """A uniform permutation of all rows per epoch (datasets whose row list fits every rank)."""

    n: int
    kind = "global"

    def stream(self, seed: int, epoch: int, phases: list[Phase], rank: int, samples_per_rank_step: int) -> RankStream:
        return rank_stream(seed, epoch, self.n, phases, rank, samples_per_rank_step)


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
