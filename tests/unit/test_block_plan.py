"""The block order (data_pipeline.order.block_order) against its definition, and the global order unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.loaders.base import LoaderSpec
from data_pipeline.loaders.factory import make_loader
from data_pipeline.order.block_order import BlockOrder, EpochBlocks
from data_pipeline.order.global_order import GlobalOrder, pool_after
from data_pipeline.order.phases import Phase, rank_range, steps_in_pool

N = 72


def spec(root: Path, rank: int, world: int, micro: int, **kw) -> LoaderSpec:
    return LoaderSpec(str(root), rank, world, micro, micro, img_size=16, seed=5, num_threads=1, **kw)


def materialized(shard_rows: np.ndarray, window: int, seed: int, epoch: int) -> np.ndarray:
    b = EpochBlocks(shard_rows, window, seed, epoch)
    return np.concatenate([b.rows(w) for w in range(b.num_windows)]) if b.num_windows else np.zeros(0, int)


def test_block_streams_equal_the_definition_over_random_layouts_and_phases():
    """For random shard sizes (empty shards too), windows, worlds, positions and exclusions, every
    rank's stream is exactly what the global plan's phase rules give over the materialized sequence."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        sizes = rng.integers(0, 9, int(rng.integers(1, 12)))
        shard_rows = np.concatenate([[0], np.cumsum(sizes)])
        n = int(shard_rows[-1])
        if n == 0:
            continue
        window = int(rng.integers(1, 4))
        order = BlockOrder(shard_rows, window)
        seq = materialized(shard_rows, window, 3, 1)
        assert sorted(seq.tolist()) == list(range(n))  # the sequence is a permutation of the rows
        phases: list[Phase] = []
        excluded: set[int] = set()
        for _k in range(int(rng.integers(1, 4))):
            world, step = int(rng.integers(1, 4)), int(rng.integers(1, 3))
            excluded |= set(rng.integers(0, n, int(rng.integers(0, 3))).tolist())
            phases.append(Phase(world, 0, tuple(sorted(excluded))))
            pool = pool_after(seq, phases)
            take = steps_in_pool(len(pool), world, step) * step
            consumed = int(rng.integers(0, take + 1))
            phases[-1] = Phase(world, consumed, tuple(sorted(excluded)))
            for r in range(world):
                lo, _ = rank_range(len(pool), r, world)
                got = order.stream(3, 1, phases, r, step)
                assert np.array_equal(got.rows, pool[lo + consumed : lo + take])
                checked += 1
    assert checked > 300


def test_block_order_reads_a_few_shards_at_a_time():
    """With 40 shards in windows of 2, a rank's consecutive samples come from at most 2 shards per
    window, and consecutive windows follow each other in its stream."""
    shard_rows = np.arange(0, 41 * 50, 50)
    st = BlockOrder(shard_rows, 2).stream(0, 0, [Phase(4, 0)], 1, 10)
    shards = st.rows // 50
    runs = [set(shards[i : i + 100].tolist()) for i in range(0, len(shards) - 100, 100)]
    assert all(len(s) <= 3 for s in runs)  # a window's 2 shards (3 where a window boundary falls inside)


def test_global_order_is_todays_permutation():
    """Existing runs resume on bit-identical keys: one phase of the global order is the seeded
    permutation of every row, cut in contiguous rank slices of whole steps."""
    n, world, step = 1000, 3, 16
    perm = np.random.default_rng([11, 4]).permutation(n)
    for r in range(world):
        lo = n * r // world
        take = (n // world) // step * step
        assert np.array_equal(GlobalOrder(n).stream(11, 4, [Phase(world, 32)], r, step).rows, perm[lo + 32 : lo + take])


@pytest.mark.parametrize("world,micro", [(1, 8), (2, 4), (3, 4)])
def test_block_order_epoch_reads_every_sample_once_in_both_loaders(demo_shards, world, micro):
    keys = {}
    for kind in ("dali", "torch"):
        specs = [spec(demo_shards, r, world, micro, order="block", block_window=2) for r in range(world)]
        loaders = [make_loader(kind, s) for s in specs]
        keys[kind] = [[k for b in lo for k in b.keys] for lo in loaders]
        assert all(lo.epoch == 1 for lo in loaders)
    assert keys["dali"] == keys["torch"]  # same order, rank by rank
    flat = [k for rank in keys["dali"] for k in rank]
    assert len(flat) == len(set(flat)) and N - len(flat) < world * micro + world
    assert len({len(r) for r in keys["dali"]}) == 1  # equal shares


def test_block_order_elastic_resume_reads_the_rest_once(demo_shards):
    """2 ranks take 2 steps, then 3 ranks with one newly excluded row finish the epoch."""
    first = [make_loader("torch", spec(demo_shards, r, 2, 6, order="block", block_window=2)) for r in range(2)]
    seen = []
    for lo in first:
        for k, b in enumerate(lo):
            seen += b.keys
            if k == 1:
                break
    state = first[0].state_dict()
    assert state["data"]["identity"]["order"] == "block/2"
    banned = (int(first[0].stream().rows[0]),)  # a sample still to come turns out bad
    second = [
        make_loader("dali", spec(demo_shards, r, 3, 4, order="block", block_window=2, excluded=banned), state)
        for r in range(3)
    ]
    rest = [k for lo in second for b in lo for k in b.keys]
    assert len(seen) == 24 and not set(seen) & set(rest) and len(rest) == len(set(rest))
    assert first[0].table.key(banned[0]) not in rest
    assert len(seen) + len(rest) > N - 1 - 12 - 3


def test_phases_store_many_excluded_rows_compactly():
    from data_pipeline.order.phases import Phase

    rows = tuple(sorted(set(np.random.default_rng(1).integers(0, 2_000_000_000, 100_000).tolist())))
    state = Phase(64, 1234, rows).to_state()
    assert Phase.from_state(state) == Phase(64, 1234, rows)
    assert len(state[2]["zdelta"]) < 8 * len(rows)  # under a raw int64 array, let alone a pickled list
    assert Phase(2, 8, (3, 7)).to_state() == [2, 8, [3, 7]]  # short lists stay as they were
