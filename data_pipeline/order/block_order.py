"""The block order: an epoch plan whose cost grows with what a rank reads, not with the dataset.

The global order (``data_pipeline.order.global_order``) permutes every row of the dataset each epoch: every rank
builds an int64 array of the dataset's length, which stops working around a hundred million samples.
The block order keeps the same guarantees (a pure function of seed and epoch; phases after any change
of world size, micro-batch, loader or exclusions; every remaining sample of an epoch read exactly once)
with a sequence that is never materialized:

* the epoch's sequence ``E`` is the shards in a seeded per-epoch permutation, cut into *windows* of
  ``window`` consecutive shards; the rows of each window are shuffled by a permutation seeded by
  (seed, epoch, window). A window is generated only when a rank needs it (a few shards' rows);
* a rank reads a contiguous slice of the epoch's pool, exactly as in the global order, so it walks
  consecutive windows and holds only a few shards at a time: whole shards can be streamed from object
  storage in plan order;
* a phase's pool is ``E`` minus what earlier phases took and minus the excluded rows. What a rank took
  in a phase is a contiguous run of that phase's pool, and pools are subsequences of ``E``, so it is one
  interval of positions in ``E``: the removed set is a handful of intervals (one per rank per phase)
  plus the excluded rows. Pool sizes per window come from window sizes, interval overlaps and excluded
  rows per window; only windows at the edge of an interval that also hold an excluded row are generated
  to count exactly.

Cost per rank and epoch: a permutation of the shard list and arrays of one entry per window, plus the
windows the rank reads; with 2 billion samples in 200,000 shards and 64 ranks, a fraction of a second
and a few megabytes (bench/data_plan.py measures it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data_pipeline.order.phases import Phase, RankStream, rank_range, steps_in_pool

_SALT = 0xB10C  # keeps the block order's draws apart from the global order's


class EpochBlocks:
    """The sequence ``E`` of one epoch: which rows sit at which positions, window by window."""

    def __init__(self, shard_rows: np.ndarray, window: int, seed: int, epoch: int, cache_windows: int = 8):
        self.shard_rows = np.asarray(shard_rows, dtype=np.int64)  # [S+1] first row of each shard
        self.window, self.seed, self.epoch = int(window), seed, epoch
        num_shards = len(self.shard_rows) - 1
        self.order = np.random.default_rng([seed, epoch, _SALT]).permutation(num_shards)
        sizes = np.diff(self.shard_rows)[self.order]
        starts = np.arange(0, num_shards, self.window)
        self.win_size = np.add.reduceat(sizes, starts) if num_shards else np.zeros(0, np.int64)
        self.win_start = np.concatenate([[0], np.cumsum(self.win_size)]).astype(np.int64)  # [W+1] in E
        self.window_of_shard = np.empty(num_shards, dtype=np.int64)
        self.window_of_shard[self.order] = np.arange(num_shards) // self.window
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_windows = cache_windows

    @property
    def num_windows(self) -> int:
        return len(self.win_size)

    def rows(self, w: int) -> np.ndarray:
        """Rows at positions ``win_start[w] ..`` of ``E``: the window's shards' rows, shuffled."""
        got = self._cache.get(w)
        if got is not None:
            self._cache.move_to_end(w)
            return got
        shards = self.order[w * self.window : (w + 1) * self.window]
        rows = np.concatenate([np.arange(self.shard_rows[s], self.shard_rows[s + 1]) for s in shards])
        rows = rows[np.random.default_rng([self.seed, self.epoch, int(w), _SALT]).permutation(len(rows))]
        self._cache[w] = rows
        if len(self._cache) > self._cache_windows:
            self._cache.popitem(last=False)
        return rows

    def window_of_rows(self, rows: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.shard_rows, rows, side="right") - 1
        return self.window_of_shard[shard]


class Removed:
    """What is no longer in a pool: intervals of positions in ``E`` and excluded rows."""

    def __init__(self, blocks: EpochBlocks, excluded: np.ndarray):
        self.blocks = blocks
        self.intervals: list[tuple[int, int]] = []  # disjoint [a, b) positions in E, sorted
        self.excluded = np.unique(np.asarray(excluded, dtype=np.int64))
        self.excluded_window = blocks.window_of_rows(self.excluded)
        self._counts: np.ndarray | None = None

    def exclude(self, rows) -> None:
        self.excluded = np.union1d(self.excluded, np.asarray(rows, dtype=np.int64))
        self.excluded_window = self.blocks.window_of_rows(self.excluded)
        self._counts = None

    def take(self, a: int, b: int) -> None:
        """Remove positions [a, b) of E (which may span positions removed before: kept disjoint)."""
        if b <= a:
            return
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted([*self.intervals, (a, b)]):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        self.intervals = merged
        self._counts = None

    def _covered(self) -> tuple[np.ndarray, np.ndarray]:
        """Per window: positions inside the intervals, and whether the window is only partly covered."""
        start, n = self.blocks.win_start, self.blocks.num_windows
        covered = np.zeros(n, dtype=np.int64)
        partial = np.zeros(n, dtype=bool)
        for a, b in self.intervals:
            w0 = int(np.searchsorted(start, a, side="right")) - 1
            w1 = int(np.searchsorted(start, b - 1, side="right")) - 1
            for w in (w0, w1) if w0 != w1 else (w0,):
                lo, hi = max(a, start[w]), min(b, start[w + 1])
                covered[w] += hi - lo
            if w1 > w0 + 1:
                covered[w0 + 1 : w1] += self.blocks.win_size[w0 + 1 : w1]
            partial[w0] = partial[w1] = True
        partial &= covered < self.blocks.win_size
        return covered, partial

    def in_intervals(self, positions: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Which of ``positions`` (all within [lo, hi)) lie in a removed interval."""
        hit = np.zeros(len(positions), dtype=bool)
        for a, b in self.intervals:
            if a < hi and b > lo:
                hit |= (positions >= a) & (positions < b)
        return hit

    def kept(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, positions in E) of window ``w`` still in the pool, in order."""
        rows = self.blocks.rows(w)
        lo, hi = int(self.blocks.win_start[w]), int(self.blocks.win_start[w + 1])
        positions = lo + np.arange(len(rows))
        keep = ~self.in_intervals(positions, lo, hi)
        ex = self.excluded[self.excluded_window == w]
        if len(ex):
            keep &= ~np.isin(rows, ex)
        return rows[keep], positions[keep]

    def counts(self) -> np.ndarray:
        """Samples of each window still in the pool."""
        if self._counts is not None:
            return self._counts
        covered, partial = self._covered()
        n = self.blocks.num_windows
        ex_per_window = np.bincount(self.excluded_window, minlength=n) if len(self.excluded) else np.zeros(n, int)
        counts = self.blocks.win_size - covered - ex_per_window
        counts[covered == self.blocks.win_size] = 0
        for w in np.flatnonzero(partial & (ex_per_window > 0)):  # count exactly where they may overlap
            counts[w] = len(self.kept(int(w))[0])
        self._counts = counts
        return counts


class BlockPool:
    """The pool of one phase, indexed 0..size-1 in the order of ``E``."""

    def __init__(self, removed: Removed):
        self.removed = removed
        self.cum = np.concatenate([[0], np.cumsum(removed.counts())]).astype(np.int64)

    @property
    def size(self) -> int:
        return int(self.cum[-1])

    def position(self, j: int) -> int:
        """Position in E of the pool's ``j``-th sample."""
        w = int(np.searchsorted(self.cum, j, side="right")) - 1
        return int(self.removed.kept(w)[1][j - self.cum[w]])

    def chunks(self, lo: int, hi: int) -> Iterator[np.ndarray]:
        """Rows of pool indices [lo, hi), a window at a time."""
        if hi <= lo:
            return
        w = int(np.searchsorted(self.cum, lo, side="right")) - 1
        while lo < hi:
            rows = self.removed.kept(w)[0]
            a, b = lo - self.cum[w], min(hi, self.cum[w + 1]) - self.cum[w]
            if b > a:
                yield rows[a:b]
            lo, w = self.cum[w + 1], w + 1


class BlockStream(RankStream):
    """A rank's rows for the rest of a phase, generated a window at a time."""

    def __init__(self, epoch: int, start: int, length: int, pool: BlockPool, lo: int):
        super().__init__(epoch, start, length)
        self._pool, self._lo = pool, lo

    def chunks(self) -> Iterator[np.ndarray]:
        return self._pool.chunks(self._lo, self._lo + self.length)


@dataclass(frozen=True)
class BlockOrder:
    """Shards permuted per epoch, rows shuffled within windows of ``window`` shards."""

    shard_rows: np.ndarray  # [S+1] first row of each shard; rows are grouped by shard in manifest order
    window: int = 4
    kind = "block"

    @property
    def n(self) -> int:
        return int(self.shard_rows[-1])

    def pool(self, seed: int, epoch: int, phases: list[Phase]) -> BlockPool:
        blocks = EpochBlocks(self.shard_rows, self.window, seed, epoch)
        removed = Removed(blocks, np.asarray(phases[0].excluded, dtype=np.int64))
        for i, ph in enumerate(phases):
            if i:
                removed.exclude(ph.excluded)
            pool = BlockPool(removed)
            if i == len(phases) - 1:
                return pool
            if ph.consumed == 0:
                continue
            # each rank took a contiguous run of this pool: one interval of E
            spans = []
            for r in range(ph.world):
                lo, _ = rank_range(pool.size, r, ph.world)
                spans.append((pool.position(lo), pool.position(lo + ph.consumed - 1) + 1))
            for a, b in spans:
                removed.take(a, b)
        raise AssertionError("unreachable: phases is never empty")

    def stream(self, seed: int, epoch: int, phases: list[Phase], rank: int, samples_per_rank_step: int) -> BlockStream:
        pool = self.pool(seed, epoch, phases)
        world = phases[-1].world
        lo, _ = rank_range(pool.size, rank, world)
        take = steps_in_pool(pool.size, world, samples_per_rank_step) * samples_per_rank_step
        start = phases[-1].consumed
        return BlockStream(epoch, start, max(0, take - start), pool, lo + start)
