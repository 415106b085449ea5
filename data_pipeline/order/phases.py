"""Epochs in phases: where each rank's share of an epoch starts and how much of it was read.

An epoch is a sequence of manifest rows (a seeded permutation in the global order, windows of
shards in the block order), minus the rows excluded as unreadable. Each rank reads a contiguous
slice of it (the split DALI's readers use) and takes as many whole optimizer steps as the
smallest slice allows; the rest of the epoch (fewer samples than one global batch plus the world
size) is left out, a different few each epoch.

Resuming must never repeat or skip a sample, whatever changed in between: the number of ranks,
the micro-batch, the loader, or the set of excluded samples (a bad JPEG found at run time). So an
epoch is a list of *phases*. A phase records the world size and excluded rows it ran with and how
many samples every rank had taken when it ended (ranks are in lockstep: the same count on every
rank). The next phase's pool is the previous pool minus everything taken and minus newly
excluded rows, split again over the new world. An uninterrupted epoch, or a resume that changed
nothing that matters, is a single phase. The micro-batch never matters: positions are samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of this rank's contiguous slice of ``num_samples``."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


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
