"""The global order: a uniform permutation of every manifest row per epoch.

Each rank builds an int64 array of the dataset's length once per epoch: the order to use up to
about a hundred million samples (``data.order=auto`` switches to the block order above that, and
for shards in object storage). ``pool_after`` is also the definition the block order is tested
against: an epoch's sequence minus what earlier phases took and minus the excluded rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipeline.order.phases import ArrayStream, Phase, RankStream, rank_range, steps_in_pool


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


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
